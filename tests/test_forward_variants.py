"""The two ways the layer loop runs the block: on the PROCESS rows only (compacted, the CPU
default) or on every row with `where` (masked, the GPU default). Both must agree."""
import pytest
import torch

from anee_fast import LLM, SamplingParams
from conftest import build_model, random_actions, random_ids


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "mistral_window"])
def test_masked_equals_compacted(arch):
    model = build_model(arch, num_layers=4)
    compacted, masked = LLM(model, block_size=8), LLM(model, block_size=8)
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
