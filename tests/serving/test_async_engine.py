"""The background engine loop: continuous batching with streaming, per-request statistics,
preemption on a tiny KV pool, abort, and a failing step that ends only its own requests.
"""
import asyncio

import pytest
import torch

from anee_fast import LLM, SamplingParams
from anee_fast.serving.async_engine import AsyncEngine
from anee_fast.engine.sequence import SequenceStatus
from conftest import build_model, random_ids

MODEL = ("llama_gqa", 3)


def _prompts(n, seed=0):
    model = build_model(*MODEL)
    return [random_ids(model, 3 + (5 * i) % 11, seed=seed + i).tolist() for i in range(n)]


def _offline(prompts, params, budgets, controllers):
    llm = LLM(build_model(*MODEL), min_layers=1)
    return [llm.generate(p, sp, energy_budget=b, controller=c)[0]
            for p, sp, b, c in zip(prompts, params, budgets, controllers)]


async def _collect(engine, seq, delay=0.0):
    """(tokens streamed event by event, number of events, the final event)."""
    await asyncio.sleep(delay)
    tokens, events = [], 0
    async for event in engine.generate(seq):
        tokens += event.new_token_ids
        events += 1
    return tokens, events, event


def _serve(llm, requests, delays):
    """Runs [(prompt, params, budget, controller)] through an AsyncEngine; request i arrives
    after delays[i] seconds."""
    engine = AsyncEngine(llm.engine)
    engine.start()
    try:
        async def main():
            seqs = [llm.engine.new_sequence(*r) for r in requests]
            results = await asyncio.gather(*(_collect(engine, s, d) for s, d in zip(seqs, delays)))
            return seqs, results
        return asyncio.run(main())
    finally:
        engine.stop()


def test_continuous_batching_streams_the_offline_outputs():
    prompts = _prompts(6)
    params = [SamplingParams(max_tokens=4 + 3 * (i % 3), ignore_eos=True) for i in range(6)]
    budgets = [1.0, 0.7, 0.4, 1.0, 0.55, 0.8]
    controllers = ["budget", "budget", "heuristic", "heuristic", [0, 1, 0], "budget"]
    refs = _offline(prompts, params, budgets, controllers)
    llm = LLM(build_model(*MODEL), min_layers=1, max_num_batched_tokens=8)   # chunked prefill
    steps = []
    original = llm.engine.step

    def step():
        steps.append(len(llm.engine.scheduler.running))
        return original()

    llm.engine.step = step
    # Requests arrive while others run: they join and leave the batch between steps.
    seqs, results = _serve(llm, list(zip(prompts, params, budgets, controllers)),
                           [0.0, 0.0, 0.01, 0.02, 0.05, 0.05])
    assert max(steps) >= 2
    for seq, (tokens, events, last), ref in zip(seqs, results, refs):
        assert tokens == ref.token_ids == seq.generated_ids
        assert last.finished and last.error is None and seq.finish_reason == "length"
        assert events >= 2                                  # tokens came as they were produced
        assert torch.equal(seq.trace().actions, ref.trace.actions)
        stats = seq.stats()
        assert stats["completion_tokens"] == len(ref.token_ids)
        assert stats["compute"] == pytest.approx(ref.trace.mean_compute)
        assert stats["layers_run_mean"] == pytest.approx(float(ref.trace.layers_run.float().mean()))
        assert stats["ttft_s"] > 0 and stats["itl_mean_s"] > 0
        assert stats["itl_p50_s"] <= stats["itl_p99_s"]
    assert llm.engine.block_manager.num_used == 0


def test_tiny_kv_pool_preempts_and_every_request_completes():
    prompts = _prompts(8, seed=20)
    params = [SamplingParams(max_tokens=10, ignore_eos=True)] * 8
    budgets = [1.0, 0.5] * 4
    refs = _offline(prompts, params, budgets, ["budget"] * 8)
    llm = LLM(build_model(*MODEL), min_layers=1, block_size=4, num_kv_blocks=12)
    requests = [(p, sp, b, "budget") for p, sp, b in zip(prompts, params, budgets)]
    seqs, results = _serve(llm, requests, [0.0] * 8)
    assert llm.engine.scheduler.num_preemptions > 0
    for (tokens, _, last), ref in zip(results, refs):
        assert tokens == ref.token_ids and last.seq.finish_reason == "length"
    assert llm.engine.block_manager.num_used == 0


def test_leaving_a_stream_aborts_and_frees_its_blocks():
    llm = LLM(build_model(*MODEL), min_layers=1, block_size=4)
    engine = AsyncEngine(llm.engine)
    engine.start()
    try:
        async def main():
            params = SamplingParams(max_tokens=50, ignore_eos=True)
            seq = llm.engine.new_sequence(_prompts(1)[0], params, 1.0, "budget")
            stream = engine.generate(seq)
            first = await anext(stream)
            assert first.new_token_ids and not first.finished
            assert llm.engine.block_manager.num_used > 0
            await stream.aclose()
            for _ in range(500):
                if seq.status is SequenceStatus.FINISHED:
                    break
                await asyncio.sleep(0.01)
            return seq
        seq = asyncio.run(main())
    finally:
        engine.stop()
    assert seq.finish_reason == "abort" and seq.num_generated < 50
    assert llm.engine.block_manager.num_used == 0
    assert engine.metrics.finished["abort"] == 1


@pytest.mark.parametrize("where", ["runner", "scheduler"])
def test_a_failing_step_ends_its_requests_and_the_loop_goes_on(where):
    """The runner failing a running request, or the scheduler failing before any runs."""
    llm = LLM(build_model(*MODEL), min_layers=1)
    owner, name = (llm.engine.runner, "run") if where == "runner" else (llm.engine.scheduler,
                                                                         "schedule")
    original = getattr(owner, name)
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == (2 if where == "runner" else 1):
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    setattr(owner, name, failing_once)
    prompt = _prompts(1)[0]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    engine = AsyncEngine(llm.engine)
    engine.start()
    try:
        async def main():
            bad = await _collect(engine, llm.engine.new_sequence(prompt, params, 1.0, "budget"))
            good = await _collect(engine, llm.engine.new_sequence(prompt, params, 1.0, "budget"))
            return bad, good
        (_, _, bad), (tokens, _, good) = asyncio.run(main())
    finally:
        engine.stop()
    assert bad.error == "RuntimeError: injected failure" and bad.seq.finish_reason == "error"
    assert bad.seq.status is SequenceStatus.FINISHED
    assert good.error is None
    assert tokens == _offline([prompt], [params], [1.0], ["budget"])[0].token_ids
    assert llm.engine.block_manager.num_used == 0 and not llm.engine.has_unfinished()
    assert engine.metrics.finished == {"error": 1, "length": 1}


def test_an_action_list_of_the_wrong_length_is_refused_up_front():
    llm = LLM(build_model(*MODEL), min_layers=1)
    with pytest.raises(ValueError, match="2 actions for a 3-layer model"):
        llm.engine.new_sequence([1, 2], SamplingParams(max_tokens=2), 1.0, [0, 1])


def test_generate_needs_a_running_loop():
    llm = LLM(build_model(*MODEL), min_layers=1)
    engine = AsyncEngine(llm.engine)
    seq = llm.engine.new_sequence([1, 2], SamplingParams(max_tokens=2), 1.0, "budget")

    async def main():
        async for _ in engine.generate(seq):
            pass
    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(main())
