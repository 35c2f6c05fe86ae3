"""The differentiable gated forward computes what the engine computes for the same actions, with
and without skip adapters; its gate carries a gradient."""
import pytest
import torch

from anee_fast import LLM
from anee_fast.actions import process_mask
from anee_fast.model.adapters import SkipAdapter, save_adapters
from anee_fast.training.gated_forward import GatedForward
from conftest import build_model, num_layers_of, random_actions, random_ids


def random_adapters(num_layers, hidden, rank, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return [SkipAdapter(scale * torch.randn(rank, hidden, generator=g) / hidden ** 0.5,
                        scale * torch.randn(hidden, rank, generator=g) / rank ** 0.5,
                        scale * torch.randn(hidden, generator=g)) for _ in range(num_layers)]


@pytest.mark.parametrize("with_adapters", [False, True])
def test_gated_forward_matches_the_engine(arch, with_adapters, tmp_path):
    model = build_model(arch, num_layers=4)
    L = num_layers_of(model)
    path = None
    if with_adapters:
        hidden = model.config.hidden_size
        path = save_adapters(random_adapters(L, hidden, 5, seed=1), tmp_path / "a", "tiny")
    llm = LLM(model, backend="reference", device="cpu", dtype=torch.float32, adapters=path)
    ids = [random_ids(model, 19, seed=s) for s in (2, 3)]
    actions = [random_actions(19, L, seed=s) for s in (4, 5)]
    expected = llm.score([i.tolist() for i in ids], actions)
    fwd = GatedForward(llm.weights)
    gates = torch.stack([process_mask(a) for a in actions]).float()          # [B, T, L]
    adapters = None if path is None else [a.tensors() for a in llm.weights.adapters]
    with torch.no_grad():
        h = fwd.run(torch.stack(ids), lambda l, h, hp: gates[..., l], adapters)
        got = fwd.logits(h)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_the_gate_has_a_gradient():
    model = build_model("llama_gqa", num_layers=3)
    llm = LLM(model, backend="reference", device="cpu", dtype=torch.float32, adapters=None)
    fwd = GatedForward(llm.weights)
    gate = torch.full((1, 7, 3), 0.5, requires_grad=True)
    fwd.logits(fwd.run(random_ids(model, 7, seed=0)[None], lambda l, h, hp: gate[..., l])).sum().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0
