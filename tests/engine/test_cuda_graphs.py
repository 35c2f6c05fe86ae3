"""Decode steps replayed from static buffers (cuda_graphs.DecodeGraphs) against the plain step.

On the CPU the static-buffer step runs without a graph (capture=False): that checks the
bucketing, the padding rows (a stale slot from a larger step would overwrite another
sequence's K/V) and the per-row budgets. The `cuda` tests replay real CUDA graphs.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anee_fast import LLM, PROCESS, SKIP, SamplingParams
from anee_fast.control.controllers import HeuristicController, StaticController

from anee_fast.engine.cuda_graphs import BUCKETS, DecodeGraphs, bucket_for, compaction_caps
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
    assert four.meta[2, 3].item() == -1
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert torch.equal(x.actions, y.actions)
        torch.testing.assert_close(x.compute, y.compute)


def test_static_buffer_steps_follow_tables_through_preemption():
    """On a tiny KV pool the scheduler preempts: a recomputed sequence decodes again with other
    blocks, and rows change sequences. The static step rewrites only the rows of its host block
    tables whose table changed, so it must notice every change (not just a new length)."""
    model = build_model("llama_gqa", num_layers=3)
    prompts = [random_ids(model, n, seed=90 + n).tolist() for n in (3, 11, 6, 1, 8)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (9, 4, 12, 7, 5)]
    roomy = LLM(model, backend="reference", device="cpu", block_size=4)
    tiny = LLM(model, backend="reference", device="cpu", block_size=4, num_kv_blocks=6)
    graphs = with_static_steps(tiny, capture=False)
    checked = check_tables_every_step(tiny, graphs)
    preemptions = []
    real_preempt = tiny.engine.scheduler._preempt
    tiny.engine.scheduler._preempt = lambda seq: (preemptions.append(seq.seq_id), real_preempt(seq))
    a = roomy.generate(prompts, params, energy_budget=0.6)
    b = tiny.generate(prompts, params, energy_budget=0.6)
    assert preemptions and checked
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert torch.equal(x.trace.actions, y.trace.actions)


def check_tables_every_step(llm, graphs):
    """Wraps graphs.run to check, after every static step, that each row's block table in the
    step's buffer is its sequence's (zero-padded; padding rows all zero). Returns the count."""
    checked = []
    real_run = graphs.run

    def run(chunks):
        out = real_run(chunks)
        manager = llm.engine.block_manager
        step = graphs.graphs[(bucket_for(len(chunks), graphs.max_rows), id(chunks[0][0].controller))]
        expected = torch.zeros_like(step.tables)
        for i, (seq, _) in enumerate(chunks):
            table = manager.tables[seq.seq_id]
            expected[i, :len(table)] = torch.tensor(table)
        assert torch.equal(step.tables, expected)
        checked.append(len(chunks))
        return out

    graphs.run = run
    return checked


def test_static_buffer_steps_follow_rows_that_change_sequence():
    """Four prompts of one length (tables of as many blocks) in bucket 4; the first finishes,
    so within the same bucket each row then holds the next sequence, whose table has the
    length of the one the row held: the step must still rewrite that row's table."""
    model = build_model("gpt2", num_layers=3)
    prompts = [random_ids(model, 6, seed=110 + i).tolist() for i in range(4)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (2, 7, 7, 7)]
    static = LLM(model, backend="reference", device="cpu", block_size=4)
    graphs = with_static_steps(static, capture=False)
    checked = check_tables_every_step(static, graphs)
    static.generate(prompts, params)
    assert 4 in checked and 3 in checked and {key[0] for key in graphs.graphs} == {4}


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


class CountAny(TorchDispatchMode):
    """Counts aten::any calls (the ops that make a multi-row predicate) while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket is torch.ops.aten.any
        return func(*args, **(kwargs or {}))


class HostGuard:
    """run_layers' layer_guard evaluated on the host: body() runs only where pred holds, as in
    a CUDA graph's conditional node. Counts, per position in a layer's guard calls, how often the
    body ran."""

    def __init__(self, calls_per_layer):
        self.calls_per_layer, self.calls, self.ran = calls_per_layer, 0, [0] * calls_per_layer

    def __call__(self, pred, body):
        assert pred.dtype == torch.bool and pred.dim() == 0
        if bool(pred):
            self.ran[self.calls % self.calls_per_layer] += 1
            body()
        self.calls += 1


@pytest.mark.parametrize("controller", ["budget", "skip_after_run"], ids=str)
def test_guarded_blocks_skip_layers_no_row_processes(controller):
    """A block runs only when some row processes the layer (and updates the residual in place);
    tokens, actions and compute are the plain steps'. The heuristic reads the residual entering
    the previous layer, so the loop keeps a copy of it for that controller: set to SKIP every
    layer after one that ran, it would never skip if that copy were the updated residual."""
    if controller == "skip_after_run":
        controller = HeuristicController(skip_saturation=-1.0, exit_saturation=2.0)
    model = build_model("llama_gqa", num_layers=4)
    plain = LLM(model, backend="reference", device="cpu", block_size=4)
    guarded = LLM(model, backend="reference", device="cpu", block_size=4)
    guard = HostGuard(1)
    runner = guarded.engine.runner
    runner.graphs = DecodeGraphs(runner, max_rows=64, width=8, capture=False, layer_guard=guard)
    budgets = [0.4, 1.0, 0.2, 0.4, 0.8]
    a = generate_shrinking(plain, model, controller, budgets)
    with CountAny() as anys:
        b = generate_shrinking(guarded, model, controller, budgets)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert torch.equal(x.actions, y.actions)
        torch.testing.assert_close(x.compute, y.compute)
    assert any((y.actions != PROCESS).any() for y in b)
    if isinstance(controller, HeuristicController):
        assert any((y.actions == SKIP).any() for y in b)
    assert guard.calls % 4 == 0 and 0 < guard.ran[0] < guard.calls    # some layers skipped
    # Bucket 1's predicate is its row's PROCESS flag (a view), the others' an any() kernel. The
    # longest sequence decodes alone for as many steps as it outlives the next longest.
    longest, next_longest = sorted(y.num_generated for y in b)[-2:][::-1]
    assert anys.count == guard.calls - 4 * (longest - next_longest) > 0


def test_compacted_guarded_blocks_run_only_the_leading_rows():
    """With row capacities, the rows are ordered PROCESS first and only the body whose
    capacity range holds the PROCESS count runs: 20 sequences (bucket 32, capacities 8 and 16)
    whose budgets make every range occur."""
    assert compaction_caps(32) == (8, 16) and compaction_caps(16) == (8,) and compaction_caps(8) == ()
    model = build_model("gpt2", num_layers=6)
    prompts = [random_ids(model, 2 + n % 5, seed=n).tolist() for n in range(20)]
    budgets = [(1.0, 0.6, 0.3, 0.3)[n % 4] for n in range(20)]
    outs = []
    for guarded in (False, True):
        llm = LLM(model, backend="reference", device="cpu", block_size=4, min_layers=1)
        guard = HostGuard(3)
        if guarded:
            runner = llm.engine.runner
            runner.graphs = DecodeGraphs(runner, max_rows=64, width=8, capture=False,
                                         layer_guard=guard, compacted=True)
        for prompt, budget in zip(prompts, budgets):
            llm.engine.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True), budget,
                                   "budget")
        done = []
        while llm.engine.has_unfinished():
            done += llm.engine.step()
        outs.append(sorted(done, key=lambda s: s.seq_id))
    for x, y in zip(*outs):
        assert x.token_ids == y.token_ids
        assert torch.equal(x.actions, y.actions)
        torch.testing.assert_close(x.compute, y.compute)
    assert {key[0] for key in runner.graphs.graphs} == {32}
    assert all(n > 0 for n in guard.ran), guard.ran      # bodies for <= 8, <= 16 and <= 32 rows ran


def test_cuda_graphs_need_a_gpu():
    model = build_model("gpt2", num_layers=3)
    with pytest.raises(ValueError, match="CUDA device"):
        LLM(model, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        LLM(model, device="cpu", cuda_graphs="yes")
    for value in (True, "compacted"):
        with pytest.raises(ValueError, match=f"conditional_layers={value!r} needs CUDA graphs"):
            LLM(model, device="cpu", conditional_layers=value)
    for value in ("on", 1):
        with pytest.raises(ValueError, match="conditional_layers must be"):
            LLM(model, device="cpu", conditional_layers=value)
    llm = LLM(model, device="cpu")
    assert llm.engine.runner.graphs is None
    with pytest.raises(ValueError, match="capturing CUDA graphs needs the model on a CUDA device"):
        llm.engine.use_decode_graphs(capture=True)
    with pytest.raises(ValueError, match="conditional layers are nodes of a captured graph"):
        llm.engine.use_decode_graphs(capture=False, conditional_layers=True)
    llm.engine.use_decode_graphs(capture=False)       # the static-buffer step, without a graph
    assert llm.engine.runner.graphs.width == -(-llm.spec.max_positions // 16)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("conditional_layers", [False, True, "compacted"])
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
