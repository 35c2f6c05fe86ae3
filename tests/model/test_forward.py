"""The two ways the layer loop runs the block: on the PROCESS rows only (compacted, the CPU
default) or on every row with `where` (masked, the GPU default), where skip_kv also gives the
queries. Both must agree, on every backend."""
import pytest
import torch

from anee_fast import LLM, SamplingParams
from conftest import build_model, random_actions, random_ids


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "mistral_window"])
def test_masked_equals_compacted(backend, arch):
    model = build_model(arch, num_layers=4)
    compacted, masked = (LLM(model, block_size=8, backend=backend) for _ in range(2))
    masked.engine.runner.compact = False
    compacted.engine.runner.compact = True
    seqs = [random_ids(model, n, seed=n) for n in (1, 9, 23)]
    acts = [random_actions(len(s), 4, seed=len(s)) for s in seqs]
    for chunk in (None, 1):
        for a, b in zip(compacted.score(seqs, acts, chunk_size=chunk), masked.score(seqs, acts, chunk_size=chunk)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = [s.tolist() for s in seqs]
    for controller, budget in (("heuristic", 0.7), ("budget", 0.4)):
        a = compacted.generate(prompts, params, energy_budget=budget, controller=controller)
        b = masked.generate(prompts, params, energy_budget=budget, controller=controller)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert all(torch.equal(x.trace.actions, y.trace.actions) for x, y in zip(a, b))


def test_masked_equals_compacted_on_triton():
    """The same on Triton's kernels (interpreted on the CPU: one short sequence, token by token)."""
    model = build_model("llama_gqa", num_layers=2)
    compacted, masked = (LLM(model, block_size=8, backend="triton") for _ in range(2))
    masked.engine.runner.compact = False
    compacted.engine.runner.compact = True
    ids = random_ids(model, 4, seed=3)
    acts = random_actions(4, 2, seed=4)
    torch.testing.assert_close(compacted.score(ids, acts, chunk_size=1),
                               masked.score(ids, acts, chunk_size=1), atol=1e-5, rtol=1e-5)
