"""ConsensusController: one decision per layer for the whole step, each row's budget still kept."""
import pytest
import torch

from anee_fast import EXIT, LLM, PROCESS, SKIP
from anee_fast.control.batch_policies import ConsensusController
from anee_fast.control.base import Controller

from conftest import build_model, random_ids

NUM_LAYERS = 6


class _Votes(Controller):
    """Row i proposes PROCESS at layer l when (i + l) % period == 0, else SKIP: rows disagree."""

    def __init__(self, period):
        self.period = period

    def propose(self, ctx):
        rows = torch.arange(ctx.h.shape[0], device=ctx.h.device)
        return torch.where((rows + ctx.layer) % self.period == 0, PROCESS, SKIP).to(torch.int8)


@pytest.fixture(scope="module")
def llm():
    return LLM(build_model("llama_gqa", NUM_LAYERS), backend="reference", min_layers=1)


def _score(llm, controller, budget, lengths=(5, 9, 3)):
    model = build_model("llama_gqa", NUM_LAYERS)
    seqs = [random_ids(model, n, seed=n) for n in lengths]
    _, traces = llm.score(seqs, energy_budget=budget, controller=controller, return_trace=True)
    return torch.cat([t.actions for t in traces]), torch.cat([t.compute for t in traces])


@pytest.mark.parametrize("period,quorum", [(2, 0.5), (3, 0.5), (3, 0.3), (2, 1.0)])
def test_every_running_row_takes_the_same_action(llm, period, quorum):
    independent, _ = _score(llm, _Votes(period), 1.0)
    actions, _ = _score(llm, ConsensusController(_Votes(period), quorum), 1.0)
    rows = actions.shape[0]
    assert (actions[:, 0] == PROCESS).all()                 # min_layers
    for l in range(1, NUM_LAYERS):
        votes = int((independent[:, l] == PROCESS).sum())
        expected = PROCESS if votes >= quorum * rows else SKIP
        assert (actions[:, l] == expected).all(), (l, votes, rows)
    # the per-token controller alone disagrees between rows: consensus changed something
    assert any(len(independent[:, l].unique()) > 1 for l in range(1, NUM_LAYERS))


@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_each_row_keeps_its_budget(llm, budget):
    actions, compute = _score(llm, ConsensusController("budget", 0.5), budget)
    floor = llm.depth.floor
    assert (compute <= max(budget, floor) + 1e-6).all()
    exited = (actions == EXIT).cumsum(dim=1) > 0
    assert ((actions == EXIT) | ~exited).all()               # EXIT stays sticky


@pytest.mark.parametrize("quorum", [0, -0.1, 1.5, True, "half"])
def test_bad_quorum_is_an_error(quorum):
    with pytest.raises(ValueError, match="quorum"):
        ConsensusController("budget", quorum)


def test_unknown_inner_controller_is_an_error():
    with pytest.raises(ValueError, match="unknown controller"):
        ConsensusController("nonsense")
