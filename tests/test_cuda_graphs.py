"""Decode steps replayed from static buffers (cuda_graphs.DecodeGraphs) against the plain step.

On the CPU the static-buffer step runs without a graph (capture=False): that checks the
bucketing, the padding rows (a stale slot from a larger step would overwrite another
sequence's K/V) and the per-row budgets. The `cuda` tests replay real CUDA graphs.
"""
from contextlib import contextmanager

import pytest
import torch

from anee_fast import LLM, SamplingParams
from anee_fast.controllers import StaticController
from anee_fast.cuda_graphs import BUCKETS, DecodeGraphs, bucket_for
from conftest import build_model, random_ids

# One StaticController object: a list would make one controller per request (no shared graph).
CONTROLLERS = [("budget", 1.0), ("budget", 0.5), ("heuristic", 0.6), (StaticController([0, 1, 2]), 1.0)]


def test_bucket_for():
    assert [bucket_for(n, 64) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert bucket_for(65, 64) is None
    assert bucket_for(48, 48) == 64
    assert bucket_for(BUCKETS[-1] + 1, 10 ** 6) is None


def generate_shrinking(llm, model, controller, budgets):
    """Five sequences that finish one by one (buckets 8 -> 4 -> 2 -> 1), each its own budget."""
    outs = []
    prompts = [random_ids(model, n, seed=n).tolist() for n in (3, 9, 5, 12, 7)]
    for prompt, budget, max_tokens in zip(prompts, budgets, (2, 9, 4, 6, 11)):
        llm.engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                               budget, controller)
    while llm.engine.has_unfinished():
        outs += llm.engine.step()
    return sorted(outs, key=lambda s: s.seq_id)


def with_static_steps(llm, capture):
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner, max_rows=64, width=8, capture=capture)
    return runner.graphs


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("controller,budget", CONTROLLERS)
def test_static_buffer_steps_match_the_plain_steps(arch, controller, budget):
    model = build_model(arch, num_layers=3)
    plain = LLM(model, backend="reference", device="cpu", block_size=4)
    static = LLM(model, backend="reference", device="cpu", block_size=4)
    graphs = with_static_steps(static, capture=False)
    budgets = [budget, 1.0, budget / 2, budget, 0.8]
    a = generate_shrinking(plain, model, controller, budgets)
    b = generate_shrinking(static, model, controller, budgets)
    assert {key[0] for key in graphs.graphs} == {8, 4, 2, 1}
    # Bucket 4 last ran 3 rows after 4: its 4th row must be padding now (it wrote K/V before).
    four = next(g for key, g in graphs.graphs.items() if key[0] == 4)
    assert four.ints[3, 2].item() == -1
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert torch.equal(x.actions, y.actions)
        torch.testing.assert_close(x.compute, y.compute)


def test_steps_that_do_not_qualify_run_plain():
    model = build_model("gpt2", num_layers=3)
    llm = LLM(model, backend="reference", device="cpu", block_size=4)
    graphs = with_static_steps(llm, capture=False)
    prompts = [random_ids(model, n, seed=n).tolist() for n in (3, 6)]
    # Two controllers in one batch; a controller that is not graph-safe; fixed actions.
    llm.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True), controller=["budget", "heuristic"])
    assert not graphs.graphs
    unsafe = StaticController([0, 1, 2])
    unsafe.graph_safe = False
    llm.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True), controller=unsafe)
    assert not graphs.graphs
    llm.score(prompts[0], torch.zeros(3, 3, dtype=torch.int8), chunk_size=1)   # fixed actions
    assert not graphs.graphs


def test_a_layer_guard_wraps_every_block_and_changes_nothing():
    """The masked variant with a guard around each block (conditional layers, here a guard that
    records its predicate and runs the body) gives the plain steps' tokens, actions and compute.
    Where the guard skips a body its predicate is false: no row processes that layer, so the
    block's `where` would have kept h anyway."""
    model = build_model("llama_gqa", num_layers=4)
    plain = LLM(model, backend="reference", device="cpu", block_size=4)
    guarded = LLM(model, backend="reference", device="cpu", block_size=4)
    predicates = []

    @contextmanager
    def recording_guard(pred):
        assert pred.dtype == torch.bool and pred.dim() == 0
        predicates.append(bool(pred))
        yield

    runner = guarded.engine.runner
    runner.graphs = DecodeGraphs(runner, max_rows=64, width=8, capture=False, layer_guard=recording_guard)
    budgets = [0.4, 1.0, 0.2, 0.4, 0.8]
    a = generate_shrinking(plain, model, "budget", budgets)
    b = generate_shrinking(guarded, model, "budget", budgets)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert torch.equal(x.actions, y.actions)
        torch.testing.assert_close(x.compute, y.compute)
    decode_steps = sum(len(s.token_ids) - 1 for s in b)         # at most; batched steps share
    assert 0 < len(predicates) <= 4 * decode_steps and len(predicates) % 4 == 0
    assert True in predicates and False in predicates           # some layers ran, some did not


def test_cuda_graphs_need_a_gpu():
    model = build_model("gpt2", num_layers=3)
    with pytest.raises(ValueError, match="CUDA device"):
        LLM(model, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        LLM(model, device="cpu", cuda_graphs="yes")
    with pytest.raises(ValueError, match="conditional_layers=True needs CUDA graphs"):
        LLM(model, device="cpu", conditional_layers=True)
    with pytest.raises(ValueError, match="conditional_layers must be"):
        LLM(model, device="cpu", conditional_layers="on")
    assert LLM(model, device="cpu").engine.runner.graphs is None


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("conditional_layers", [False, True])
def test_graph_replays_match_eager_steps_on_the_gpu(backend, arch, conditional_layers):
    model = build_model(arch, num_layers=3)
    eager = LLM(model, backend=backend, device="cuda", dtype=torch.float32, block_size=4,
                cuda_graphs=False)
    graphed = LLM(model, backend=backend, device="cuda", dtype=torch.float32, block_size=4,
                  conditional_layers=conditional_layers)
    assert graphed.engine.runner.graphs is not None
    for controller, budget in CONTROLLERS:
        budgets = [budget, 1.0, budget / 2, budget, 0.8]
        a = generate_shrinking(eager, model, controller, budgets)
        b = generate_shrinking(graphed, model, controller, budgets)
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            assert torch.equal(x.actions, y.actions)
            torch.testing.assert_close(x.compute, y.compute)
    assert {key[0] for key in graphed.engine.runner.graphs.graphs} >= {8, 4, 2, 1}
    assert all(g.graph is not None for g in graphed.engine.runner.graphs.graphs.values())
