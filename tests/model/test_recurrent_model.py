"""Weight-tied (recurrent) models in the engine: the same exactness tests as ordinary models.

The reference next to the tests is RecurrentTransformer.forward itself: a plain PyTorch loop that
applies the shared block once per virtual layer on every token and keeps its output where the
token PROCESSes (h = where(process, block(h), h)). The engine runs the packed weights, in which the tied
virtual layers share one block's tensors.
"""
import json
import os

import pytest
import torch

from anee_fast import EXIT, LLM, PROCESS, SKIP, SamplingParams
from anee_fast.ops.backends import backends
from anee_fast.model.recurrent import RecurrentConfig, RecurrentTransformer, load, save
from conftest import random_actions
from test_actions import reference_process_mask

TIGHT = 1e-5     # same engine, different batching / chunking
REF_TOL = 1e-4   # engine vs the looping reference

# Odd sizes: hidden 40 = 5 heads x 8 over 5 KV heads (MHA) or 1 (GQA 5:1), vocab 53.
CONFIGS = {
    "prelude_coda": RecurrentConfig(vocab_size=53, hidden_size=40, num_heads=5, num_kv_heads=1,
                                    intermediate_size=67, prelude=1, block=2, iterations=3, coda=1,
                                    max_positions=64),
    "bare_block": RecurrentConfig(vocab_size=53, hidden_size=40, num_heads=5, num_kv_heads=5,
                                  intermediate_size=67, prelude=0, block=1, iterations=5, coda=0,
                                  max_positions=64),
}


_models = {}


def build(name: str) -> RecurrentTransformer:
    """A random model whose norm weights are perturbed away from 1 (cached; do not modify)."""
    if name not in _models:
        torch.manual_seed(0)
        model = RecurrentTransformer(CONFIGS[name]).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.15)
        _models[name] = model
    return _models[name]


def random_ids(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 53, (length,), generator=g)


@torch.no_grad()
def reference_logits(model, ids, actions=None):
    process = None if actions is None else reference_process_mask(actions)[None]
    return model(torch.as_tensor(ids)[None], process)[0]


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(params=list(CONFIGS))
def name(request):
    return request.param


def test_block_of_maps_virtual_layers_to_stored_blocks():
    c = CONFIGS["prelude_coda"]    # prelude 1, block 2 x 3 iterations, coda 1
    assert c.num_layers == 8 and c.num_blocks == 4
    assert [c.block_of(l) for l in range(8)] == [0, 1, 2, 1, 2, 1, 2, 3]
    assert c.iteration_end(0) == 1 and c.iteration_end(3) == 7
    with pytest.raises(ValueError, match="outside"):
        c.block_of(8)


@pytest.mark.parametrize("bad, match", [
    (dict(iterations=0), "iterations must be an integer >= 1"),
    (dict(prelude=-1), "prelude must be an integer >= 0"),
    (dict(num_heads=3), "split into num_heads"),
    (dict(hidden_size=35, num_heads=5, num_kv_heads=5), "must be even"),
])
def test_config_rejects_bad_shapes(bad, match):
    fields = dict(vocab_size=53, hidden_size=40, num_heads=5, num_kv_heads=1)
    with pytest.raises(ValueError, match=match):
        RecurrentConfig(**{**fields, **bad})


def test_packing_shares_the_block_tensors_without_copies(name):
    model = build(name)
    c = model.config
    weights = LLM(model).weights
    assert len(weights.layers) == c.num_layers
    for l in range(c.num_layers):
        block = model.blocks[c.block_of(l)]
        layer = weights.layers[l]
        # Virtual layers that run one block hold the very same LayerWeights.
        assert all(weights.layers[m] is layer for m in range(c.num_layers)
                   if c.block_of(m) == c.block_of(l))
        # Every tensor is the parameter itself.
        assert layer.kvq_weight.data_ptr() == block.kvq.weight.data_ptr()
        assert layer.attn_norm_weight.data_ptr() == block.attn_norm.data_ptr()
        assert layer.o_weight.data_ptr() == block.o.weight.data_ptr()
        assert layer.down_weight.data_ptr() == block.down.weight.data_ptr()
    distinct = {id(layer) for layer in weights.layers}
    assert len(distinct) == c.num_blocks


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_full_depth_and_fixed_actions_match_the_looping_reference(name, chunk_size):
    model = build(name)
    llm = LLM(model, backend="reference", block_size=8)
    L = model.config.num_layers
    ids = random_ids(29, seed=1)
    assert max_err(llm.score(ids, chunk_size=chunk_size), reference_logits(model, ids)) <= REF_TOL
    actions = random_actions(29, L, seed=2)
    got = llm.score(ids, actions=actions, chunk_size=chunk_size)
    assert max_err(got, reference_logits(model, ids, actions)) <= REF_TOL
    assert max_err(got, reference_logits(model, ids)) > 1e-3     # the actions matter


def test_prefill_equals_decode_equals_ragged(name):
    model = build(name)
    llm = LLM(model, backend="reference", block_size=8)
    L = model.config.num_layers
    lengths = [23, 1, 9, 16]
    seqs = [random_ids(n, seed=100 + n) for n in lengths]
    acts = [random_actions(n, L, seed=200 + n) for n in lengths]
    alone = [llm.score(ids, actions=a) for ids, a in zip(seqs, acts)]
    for ids, a, ref in zip(seqs, acts, alone):
        assert max_err(llm.score(ids, actions=a, chunk_size=1), ref) <= TIGHT
    for chunk_size in (None, 1, 4):
        for out, ref in zip(llm.score(seqs, actions=acts, chunk_size=chunk_size), alone):
            assert max_err(out, ref) <= TIGHT


def test_decode_exit_writes_every_later_iteration(name):
    """Every token that halts at layer e must leave the K/V of layers e..L-1 (tied blocks of
    later iterations) from its unchanged residual: the next tokens read them."""
    model = build(name)
    llm = LLM(model, backend="reference", block_size=8)
    L = model.config.num_layers
    T = 2 * (L + 1)
    ids = random_ids(T, seed=5)
    actions = torch.full((T, L), PROCESS, dtype=torch.int8)
    for t in range(T):
        e = t % (L + 1)          # token t halts at layer e (e == L: never)
        if e < L:
            actions[t, e] = EXIT
    ref = reference_logits(model, ids, actions)
    assert max_err(llm.score(ids, actions=actions, chunk_size=1), ref) <= REF_TOL
    assert max_err(llm.score(ids, actions=actions), ref) <= REF_TOL


def test_skip_kv_weights_are_views_of_the_stored_block():
    """Layers 1 and 3 run block 1: skip_kv reads that block's parameters, its K|V rows alone or
    K|V|Q (with_q)."""
    model = build("prelude_coda")                    # blocks per layer: 0 1 2 1 2 1 2 3
    weights = LLM(model).weights
    spec, block = weights.spec, model.blocks[1]
    for layer in (1, 3):
        for with_q, rows in ((False, 2 * spec.kv_size), (True, 2 * spec.kv_size + spec.q_size)):
            norm_w, norm_b, kv_w, kv_b = weights.skip_kv_weights(layer, with_q=with_q)
            assert kv_w.data_ptr() == block.kvq.weight.data_ptr()
            assert kv_w.shape == (rows, spec.hidden_size)
            assert norm_w.data_ptr() == block.attn_norm.data_ptr()
            assert norm_w.shape == (spec.hidden_size,) and norm_b is None and kv_b is None


def test_halting_with_a_coda_still_runs_the_coda():
    """With always_last = coda, a controller's EXIT skips the remaining iterations but the depth
    policy still PROCESSes the coda (the halted token's answer is read through it)."""
    model = build("prelude_coda")
    c = model.config
    llm = LLM(model, backend="reference", min_layers=c.prelude, always_last=c.coda)
    halt_after_one = [PROCESS] * c.iteration_end(1) + [EXIT] * (c.num_layers - c.iteration_end(1))
    out = llm.generate([random_ids(5, seed=7).tolist()], SamplingParams(max_tokens=3, ignore_eos=True),
                       controller=halt_after_one)[0]
    actions = out.trace.actions
    assert (actions[:, :c.iteration_end(1)] == PROCESS).all()
    assert (actions[:, c.iteration_end(1):c.num_layers - c.coda] == SKIP).all()
    assert (actions[:, c.num_layers - c.coda:] == PROCESS).all()


def test_save_and_load_round_trip(tmp_path):
    model = build("prelude_coda")
    save(model, tmp_path / "m")
    again = load(tmp_path / "m")
    assert again.config == model.config
    ids = random_ids(11, seed=9)
    assert max_err(LLM(str(tmp_path / "m")).score(ids), reference_logits(model, ids)) <= REF_TOL
    config_path = tmp_path / "m" / "recurrent_config.json"
    fields = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(fields, intermediate_size=31)))
    with pytest.raises(ValueError, match="weights do not match recurrent_config.json"):
        load(tmp_path / "m")
    config_path.write_text('{"vocab_size": 0}')
    with pytest.raises(ValueError, match="not a valid recurrent model config"):
        load(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a recurrent model checkpoint"):
        load(tmp_path)


# Triton's interpreter is slow: one configuration on the CPU.
END_TO_END = [("native", n) for n in CONFIGS] + [
    ("triton", n) for n in (("prelude_coda",) if os.environ.get("TRITON_INTERPRET") == "1"
                            else list(CONFIGS))]


@pytest.mark.parametrize("backend,name", END_TO_END)
def test_every_backend_matches_the_reference_backend(backend, name):
    assert backends()[backend] is True, backends()[backend]
    model = build(name)
    fast = LLM(model, backend=backend, block_size=8)
    slow = LLM(model, backend="reference", block_size=8)
    L = model.config.num_layers
    ids = random_ids(19, seed=3)
    actions = random_actions(19, L, seed=4)
    for chunk in (None, 1):
        torch.testing.assert_close(fast.score(ids, actions, chunk_size=chunk),
                                   slow.score(ids, actions, chunk_size=chunk), atol=1e-4, rtol=1e-4)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    prompts = [random_ids(n, seed=n).tolist() for n in (3, 8)]
    a = fast.generate(prompts, params, energy_budget=0.6, controller="heuristic")
    b = slow.generate(prompts, params, energy_budget=0.6, controller="heuristic")
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_cast_to_another_dtype_keeps_every_block(name):
    # Casting creates new tensors and frees the packed originals: a cast keyed by id() alone
    # once handed one block's weights to another (CPU float64 and CUDA float32 both showed it).
    model = build(name)
    L = model.config.num_layers
    ids, actions = random_ids(17, seed=7), random_actions(17, L, seed=8)
    wide = LLM(model, backend="reference", device="cpu", dtype=torch.float64, block_size=8)
    plain = LLM(model, backend="reference", device="cpu", block_size=8)
    torch.testing.assert_close(wide.score(ids, actions).float(), plain.score(ids, actions),
                               atol=REF_TOL, rtol=REF_TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_weight_tied_model_on_the_gpu_matches_the_cpu_reference(backend, name):
    model = build(name)
    gpu = LLM(model, backend=backend, device="cuda", dtype=torch.float32, block_size=8)
    cpu = LLM(model, backend="reference", device="cpu", block_size=8)
    L = model.config.num_layers
    ids = random_ids(23, seed=11)
    actions = random_actions(23, L, seed=12)
    for chunk in (None, 1):
        torch.testing.assert_close(gpu.score(ids, actions, chunk_size=chunk).cpu(),
                                   cpu.score(ids, actions, chunk_size=chunk), atol=1e-3, rtol=1e-3)
