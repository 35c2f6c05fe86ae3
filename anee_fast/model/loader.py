"""Resolves `LLM(model)`: hub id, local directory, .gguf file, a loaded transformers model, or
a weight-tied RecurrentTransformer (the module or its saved directory)."""
import os

import torch

from . import default_model
from . import recurrent as recurrent_model
from .packing import pack_hf_model
from .weight_storage import check_weights_mode, store_weights


class ModelLoadError(RuntimeError):
    pass


def default_device(device=None) -> torch.device:
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"bad device {device!r}: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r}: CUDA is not available ({why})")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, dtype=None) -> torch.dtype:
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _from_pretrained(source, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"could not load model weights from {source!r}: "
                             f"{type(e).__name__}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception:
        tokenizer = None   # scoring token ids needs none; generate() from text says so
    return model, tokenizer


def check_local_path(name: str) -> str:
    """A name that is plainly a local path (absolute, ./, ~, several slashes, .gguf) must exist:
    otherwise it would be tried as a hub id. Returns it with ~ expanded."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf")
    name = os.path.expanduser(name)
    if looks_local and not os.path.exists(name):
        raise ModelLoadError(f"{name} does not exist (give a model directory, a .gguf file or a "
                             "hub id)")
    return name


def load_hf(model):
    """Returns (transformers model, tokenizer or None, display name)."""
    if model is None:
        path = default_model.converted_dir()
        hf, tok = _from_pretrained(path)
        return hf, tok, default_model.NAME
    if isinstance(model, torch.nn.Module):
        if not hasattr(model, "config"):
            raise ModelLoadError(f"{type(model).__name__} is not a transformers model (no .config)")
        return model, None, getattr(model.config, "name_or_path", "") or type(model).__name__
    if not isinstance(model, (str, os.PathLike)):
        raise ModelLoadError(f"model must be a hub id, a directory, a .gguf file or a transformers "
                             f"model, got {type(model).__name__}")
    name = check_local_path(os.fspath(model))
    if recurrent_model.is_checkpoint(name):
        return recurrent_model.load(name), None, name
    if name.endswith(".gguf"):
        folder, file = os.path.split(os.path.abspath(name))
        hf, tok = _from_pretrained(folder, gguf_file=file)
        return hf, tok, file
    if os.path.exists(name) and not os.path.isdir(name):
        raise ModelLoadError(f"{name} is a file: give a model directory or a .gguf file")
    hf, tok = _from_pretrained(name)
    return hf, tok, name


def gguf_source(model):
    """The GGUF file `model` names (the embedded model's for None), or None."""
    if model is None:
        return default_model.gguf_path()
    if isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(".gguf"):
        return os.path.abspath(os.path.expanduser(os.fspath(model)))
    return None


def load_weights(model, device=None, dtype=None, weights="auto"):
    """Returns (ModelWeights on device, tokenizer or None, name); `weights` says how the
    projections are stored (model/weight_storage.py: "auto" keeps a GGUF's own blocks)."""
    check_weights_mode(weights)
    hf, tokenizer, name = load_hf(model)
    device = default_device(device)
    packed = pack_hf_model(hf, dtype=default_dtype(device, dtype), device=device)
    del hf        # the float tensors a quantized format replaces are freed with it
    return store_weights(packed, weights, gguf_source(model)), tokenizer, name
