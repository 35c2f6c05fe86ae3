"""LLM(weights=...): the embedded GGUF's blocks used as they are (the same function as its float
copy), int8 / bf16 for any model, bytes in memory, and clear errors."""
import os

import pytest
import torch

from anee_fast import LLM, SamplingParams
from anee_fast.model import default_model
from anee_fast.model.loader import load_weights
from anee_fast.model.packing import pack_hf_model
from anee_fast.model.weight_storage import PROJECTIONS, store_weights
from anee_fast.ops.weight_formats import QuantizedWeight, dequantize
from anee_fast.training.gated_forward import GatedForward
from conftest import build_model, random_ids


@pytest.fixture(scope="module")
def embedded():
    """(GGUF blocks, float copy) of the embedded model's weights."""
    return load_weights(None, weights="gguf")[0], load_weights(None, weights="fp32")[0]


@pytest.mark.slow
def test_gguf_blocks_are_the_float_model_exactly(embedded):
    """Every projection, the embedding and the LM head dequantize bit for bit to the float copy
    (transformers' own dequantization of the same file): names, row order and layouts right."""
    blocks, floats = embedded
    assert blocks.weight_format == "gguf" and blocks.dtype == torch.float32
    assert isinstance(blocks.embed, QuantizedWeight) and blocks.embed.format == "q8_0"
    assert blocks.lm_head is blocks.embed                       # tied: stored once
    for got, want in zip(blocks.layers, floats.layers):
        for name in PROJECTIONS:
            stored = getattr(got, name)
            assert isinstance(stored, QuantizedWeight) and stored.format == "q4_1"
            assert torch.equal(dequantize(stored), getattr(want, name)), name
        assert torch.equal(dequantize(got.kv_weight), want.kv_weight)     # the SKIP path's view
    assert torch.equal(dequantize(blocks.embed), floats.embed)


@pytest.mark.slow
def test_gguf_weights_take_about_the_file_size(embedded):
    blocks, floats = embedded
    size = os.path.getsize(default_model.gguf_path())
    assert blocks.nbytes() <= 1.2 * size
    assert floats.nbytes() > 5 * size
    # A SKIP's share of a layer's bytes barely moves: K/V rows are quantized like the rest.
    assert blocks.skip_cost() == pytest.approx(floats.skip_cost(), abs=0.002)


def test_quantized_weights_score_as_their_dequantized_floats():
    """The reference multiplies dequantized values in float32: replacing every int8 weight by
    its float32 values (in place, same engine) gives the same logits."""
    model = build_model("llama_tied")
    ids = random_ids(model, 12, seed=3)
    llm = LLM(model, backend="reference", weights="int8")
    got = llm.score(ids)
    weights = llm.weights
    for layer in weights.layers:
        for name in PROJECTIONS:
            setattr(layer, name, dequantize(getattr(layer, name)))
        layer.make_views()
    weights.embed = weights.lm_head = dequantize(weights.embed)
    torch.testing.assert_close(got, llm.score(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,kl_max", [("bf16", 1e-3), ("int8", 3e-2)])
def test_int8_and_bf16_stay_close_to_fp32(mode, kl_max):
    model = build_model("llama_gqa")
    ids = random_ids(model, 16, seed=1)
    base = LLM(model, backend="reference").score(ids)
    llm = LLM(model, backend="reference", weights=mode)
    assert llm.weights.weight_format == mode and llm.weights.dtype == torch.float32
    got = llm.score(ids)
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), base.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert 0 < kl < kl_max
    assert llm.weights.nbytes() < LLM(model, backend="reference").weights.nbytes() * (0.55 if mode == "bf16" else 0.35)


def test_bad_weights_modes_are_clear_errors():
    model = build_model("gpt2")
    with pytest.raises(ValueError, match="weights must be one of"):
        LLM(model, weights="q3")
    with pytest.raises(ValueError, match="needs a model loaded from a .gguf"):
        LLM(model, weights="gguf")
    weights = pack_hf_model(model)
    assert store_weights(weights, "auto") is weights and weights.weight_format == "float"


def test_training_refuses_quantized_weights():
    model = build_model("llama_tied")
    with pytest.raises(ValueError, match="weights='fp32'"):
        GatedForward(LLM(model, backend="reference", weights="int8").weights)
    GatedForward(LLM(model, backend="reference", weights="fp32").weights)


@pytest.mark.slow
def test_embedded_model_runs_its_gguf_blocks_by_default():
    llm = LLM(backend="reference", adapters=None)
    assert llm.weights.weight_format == "gguf"
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4))[0]
    assert "Paris" in out.text


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gguf_blocks_decode_as_the_float_model_does(backend):
    """End to end on the embedded model: the GGUF blocks through the backend's quantized kernels
    give the float copy's logits up to summation order, in one prefill (past the GEMV rows) and
    token by token (the GEMVs), and the same greedy tokens."""
    blocks = LLM(backend=backend, weights="gguf", adapters=None)
    floats = LLM(backend=backend, weights="fp32", adapters=None)
    ids = blocks.tokenizer("Adaptive depth saves compute where a token is easy, and")["input_ids"]
    for chunk_size in (None, 1):
        torch.testing.assert_close(blocks.score(ids, chunk_size=chunk_size),
                                   floats.score(ids, chunk_size=chunk_size), atol=2e-3, rtol=1e-3)
    params = SamplingParams(max_tokens=24)
    assert (blocks.generate([ids], params)[0].token_ids == floats.generate([ids], params)[0].token_ids)
