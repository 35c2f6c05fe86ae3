"""Full budget: the engine's logits equal transformers' own, on every path through the engine.

`LLM(hf_model).score(ids)` runs every layer (energy_budget 1.0, controller "budget"), so it must
reproduce `hf_model(ids).logits` in fp32 whether the sequence goes in one prefill, k tokens at a
time through the paged decode path, or inside a ragged batch, for any KV block size.
"""
import copy

import pytest
import torch

from anee_fast import LLM, PROCESS
from conftest import ARCHS, CORE_ARCHS, build_model, hf_logits, num_layers_of, random_ids

ATOL = 1e-4


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module", params=["reference", "native"])
def llms(request):
    """One LLM per architecture (its cache is reused across tests, as in serving), on each CPU
    backend: the reference itself against transformers, and the native ops."""
    made = {}

    def get(arch, **kwargs):
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = LLM(build_model(arch), backend=request.param, **kwargs)
        return made[key]
    return get


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("length", [1, 7, 37])
def test_prefill_matches_hf(llms, arch, length):
    model = build_model(arch)
    llm = llms(arch)
    ids = random_ids(model, length, seed=length)
    logits, trace = llm.score(ids, return_trace=True)
    assert logits.dtype == torch.float32
    assert logits.shape == (length, model.config.vocab_size)
    assert max_err(logits, hf_logits(model, ids)) <= ATOL
    # Full budget: every token ran every layer and spent exactly one full forward.
    assert (trace.actions == PROCESS).all()
    assert trace.actions.shape == (length, num_layers_of(model))
    torch.testing.assert_close(trace.compute, torch.ones(length))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk_size", [1, 5])
def test_chunked_decode_matches_hf(llms, arch, chunk_size):
    model = build_model(arch)
    llm = llms(arch)
    ids = random_ids(model, 37, seed=11)
    assert max_err(llm.score(ids, chunk_size=chunk_size), hf_logits(model, ids)) <= ATOL


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_ragged_batch_matches_hf_alone(llms, arch, chunk_size):
    model = build_model(arch)
    llm = llms(arch)
    lengths = [7, 1, 37, 13]
    seqs = [random_ids(model, n, seed=100 + i) for i, n in enumerate(lengths)]
    out = llm.score(seqs, chunk_size=chunk_size)
    assert isinstance(out, list) and len(out) == len(seqs)
    for ids, logits in zip(seqs, out):
        assert logits.shape == (len(ids), model.config.vocab_size)
        assert max_err(logits, hf_logits(model, ids)) <= ATOL
    # Token lists (not tensors) work the same.
    out_lists = llm.score([s.tolist() for s in seqs[:2]], chunk_size=chunk_size)
    for a, b in zip(out_lists, out[:2]):
        assert max_err(a, b) <= 1e-5


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_block_sizes(arch, block_size, chunk_size, backend):
    model = build_model(arch)
    llm = LLM(model, block_size=block_size, num_kv_blocks=24, backend=backend)
    assert llm.engine.block_manager.block_size == block_size
    seqs = [random_ids(model, n, seed=7 + n) for n in (37, 9, 33)]
    for ids, logits in zip(seqs, llm.score(seqs, chunk_size=chunk_size)):
        assert max_err(logits, hf_logits(model, ids)) <= ATOL
    assert llm.engine.block_manager.num_used == 0


@pytest.mark.parametrize("arch", ["mistral_window", "qwen2_window"])
def test_sliding_window_is_applied_by_hf_and_by_us(arch):
    """The window (5 resp. 4 positions) is shorter than the sequence: it must change the logits,
    transformers must apply it the same way in eager and sdpa, and so must we."""
    model = build_model(arch)
    ids = random_ids(model, 37, seed=5)
    ref = hf_logits(model, ids)

    eager_cfg = copy.deepcopy(model.config)
    eager = type(model)._from_config(eager_cfg, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    assert eager.config._attn_implementation == "eager"
    assert max_err(hf_logits(eager, ids), ref) <= ATOL

    full_cfg = copy.deepcopy(model.config)
    full_cfg.sliding_window = None
    full_cfg.use_sliding_window = False
    if hasattr(full_cfg, "layer_types") and full_cfg.layer_types is not None:
        full_cfg.layer_types = ["full_attention"] * full_cfg.num_hidden_layers
    no_window = type(model)(full_cfg).eval()
    no_window.load_state_dict(model.state_dict())
    assert max_err(hf_logits(no_window, ids), ref) > 1e-2, "the window should matter here"
    # Inside the window (first positions) both agree.
    assert max_err(hf_logits(no_window, ids[:4]), ref[:4]) <= ATOL

    llm = LLM(model)
    assert any(layer.sliding_window is not None for layer in llm.weights.layers)
    for chunk_size in (None, 1):
        assert max_err(llm.score(ids, chunk_size=chunk_size), ref) <= ATOL


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_bf16_weights_keep_float32_norms(arch):
    """In bf16 every projection is bf16 but the norm parameters stay float32 (every backend
    normalises in float32; the CUDA kernels would otherwise convert them on every call), and the
    logits stay close to transformers' fp32 ones."""
    model = build_model(arch)
    llm = LLM(model, dtype=torch.bfloat16, backend="reference")
    weights = llm.weights
    layer = weights.layers[0]
    norms = [layer.attn_norm_weight, layer.mlp_norm_weight, weights.final_norm_weight]
    assert all(t.dtype == torch.float32 for t in norms)
    assert {layer.kvq_weight.dtype, layer.up_weight.dtype, weights.lm_head.dtype} == {torch.bfloat16}
    ids = random_ids(model, 9, seed=3)
    ref = hf_logits(model, ids)
    assert max_err(llm.score(ids), ref) <= 0.05 * ref.abs().max().item()
