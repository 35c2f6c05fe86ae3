"""The backends as a whole: which are usable and chosen, and each one's engine end to end
against the reference backend's."""
import os

import pytest
import torch

from anee_fast import LLM, SamplingParams, backends
from anee_fast.ops.backends import select_backend
from conftest import build_model, random_actions, random_ids


# Triton's interpreter is slow: on the CPU it runs one architecture end to end (the per-op tests
# cover LayerNorm, biases and MHA); on a GPU every architecture.
END_TO_END = [("native", a) for a in ("gpt2", "llama_gqa", "qwen2")] + [
    ("triton", a) for a in (("llama_gqa",) if os.environ.get("TRITON_INTERPRET") == "1"
                            else ("gpt2", "llama_gqa", "qwen2"))]


@pytest.mark.parametrize("backend,arch", END_TO_END)
def test_engine_matches_reference_end_to_end(backend, arch):
    assert backends()[backend] is True, backends()[backend]
    model = build_model(arch, num_layers=3)
    fast, slow = LLM(model, backend=backend, block_size=8), LLM(model, backend="reference", block_size=8)
    ids = random_ids(model, 19, seed=3)
    actions = random_actions(19, 3, seed=4)
    for chunk in (None, 1):
        torch.testing.assert_close(fast.score(ids, actions, chunk_size=chunk),
                                   slow.score(ids, actions, chunk_size=chunk), atol=1e-4, rtol=1e-4)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [random_ids(model, n, seed=n).tolist() for n in (3, 9)]
    for controller, budget in (("budget", 1.0), ("heuristic", 0.6)):
        a = fast.generate(prompts, params, energy_budget=budget, controller=controller)
        b = slow.generate(prompts, params, energy_budget=budget, controller=controller)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert all(torch.equal(x.trace.actions, y.trace.actions) for x, y in zip(a, b))


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "llama_variants", "qwen2"])
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_engine_on_the_gpu_matches_the_cpu_reference(backend, arch):
    """float32 on the GPU against the CPU reference: logits under a fixed action matrix (whole
    prompt, token by token, ragged batch) and greedy tokens and actions under the controllers."""
    model = build_model(arch, num_layers=3)
    gpu = LLM(model, backend=backend, device="cuda", dtype=torch.float32, block_size=8)
    cpu = LLM(model, backend="reference", device="cpu", block_size=8)
    ids = random_ids(model, 21, seed=5)
    actions = random_actions(21, 3, seed=6)
    for chunk in (None, 1):
        torch.testing.assert_close(gpu.score(ids, actions, chunk_size=chunk).cpu(),
                                   cpu.score(ids, actions, chunk_size=chunk), atol=1e-3, rtol=1e-3)
    ragged = [random_ids(model, n, seed=n) for n in (4, 13)]
    ragged_actions = [random_actions(n, 3, seed=n + 1) for n in (4, 13)]
    for a, b in zip(gpu.score(ragged, ragged_actions), cpu.score(ragged, ragged_actions)):
        torch.testing.assert_close(a.cpu(), b, atol=1e-3, rtol=1e-3)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [random_ids(model, n, seed=n).tolist() for n in (3, 9, 17)]
    for controller, budget in (("budget", 1.0), ("budget", 0.5), ("heuristic", 0.6)):
        a = gpu.generate(prompts, params, energy_budget=budget, controller=controller)
        b = cpu.generate(prompts, params, energy_budget=budget, controller=controller)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert all(torch.equal(x.trace.actions, y.trace.actions) for x, y in zip(a, b))


def test_backends_report_reasons_and_selection_errors(monkeypatch):
    found = backends()
    assert found["reference"] is True
    assert all(v is True or (isinstance(v, str) and v) for v in found.values())
    with pytest.raises(ValueError, match="unknown backend"):
        LLM(build_model("gpt2"), backend="cuda-magic")
    assert select_backend("auto", "cpu") in ("native", "reference")   # never the interpreter
    monkeypatch.setenv("ANEE_FAST_BACKEND", "reference")
