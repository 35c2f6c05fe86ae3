"""Controllers' proposals on hand-made layer contexts, next to what each rule says."""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model

from anee_fast import EXIT, PROCESS, SKIP, LLM, SamplingParams
from anee_fast.control.anee_mlp import ANEEMLPController
from anee_fast.control.base import LayerContext
from anee_fast.control.controllers import BudgetController, HeuristicController, StaticController
from anee_fast.control.batch_policies import ConsensusController
from anee_fast.control.registry import CONTROLLER_NAMES, make_controller
from anee_fast.control.trained import BudgetConditionedController
from anee_fast.ops import reference


def context(h, h_prev, budget_left=1.0, layer=3, readout=None):
    n = h.shape[0]
    return LayerContext(layer=layer, num_layers=8, h=h, h_prev=h_prev,
                        budget_left=torch.full((n,), budget_left), readout=readout,
                        ops=reference)


def rotated(h, cos):
    """A vector at the given cosine to each row of h, of the same norm."""
    other = torch.randn_like(h)
    other -= (other * h).sum(-1, keepdim=True) / (h * h).sum(-1, keepdim=True) * h
    other = F.normalize(other, dim=-1) * h.norm(dim=-1, keepdim=True)
    sin = (1 - cos ** 2) ** 0.5
    return cos * h + sin * other


def test_heuristic_skips_exits_and_runs_after_a_skip():
    torch.manual_seed(0)
    h = torch.randn(4, 32)
    h_prev = torch.stack([rotated(h[0:1], 0.5)[0], rotated(h[1:2], 0.985)[0],
                          rotated(h[2:3], 0.999)[0], h[3]])       # row 3: the layer before skipped
    got = HeuristicController(skip_saturation=0.98, exit_saturation=0.995).propose(context(h, h_prev))
    assert got.tolist() == [PROCESS, SKIP, EXIT, PROCESS]
    assert got.dtype == torch.int8


def test_heuristic_confidence_reads_the_lm_head_only_when_asked():
    torch.manual_seed(1)
    h = torch.randn(3, 16)
    h_prev = rotated(h, 0.2)
    calls = []

    def readout():
        calls.append(1)
        return torch.zeros(3), torch.tensor([0.95, 0.5, 0.91])

    ctx = context(h, h_prev, readout=readout)
    assert HeuristicController().propose(ctx).tolist() == [PROCESS] * 3 and not calls
    got = HeuristicController(confidence=0.9).propose(ctx)
    assert got.tolist() == [EXIT, PROCESS, EXIT] and calls


def test_budget_controller_exits_under_its_threshold():
    h = torch.randn(2, 8)
    ctx = LayerContext(layer=3, num_layers=8, h=h, h_prev=torch.randn(2, 8),
                       budget_left=torch.tensor([0.05, 0.5]), ops=reference)
    assert BudgetController(exit_threshold=0.1).propose(ctx).tolist() == [EXIT, PROCESS]
    assert BudgetController().propose(ctx).tolist() == [PROCESS, PROCESS]


def test_static_controller_and_names():
    h = torch.randn(2, 8)
    got = StaticController([0, 1, 2, 0, 1, 0, 0, 0]).propose(context(h, h, layer=2))
    assert got.tolist() == [EXIT, EXIT]
    assert isinstance(make_controller("heuristic"), HeuristicController)
    assert isinstance(make_controller([0, 1]), StaticController)


def test_every_controller_class_has_its_own_name(tmp_path):
    """"learned" is the trained budget-conditioned controller; ANEE 0.4's MLP, loaded from its
    file, is "anee-mlp": no two controller classes share a name."""
    classes = [BudgetController, HeuristicController, StaticController, ANEEMLPController,
               BudgetConditionedController, ConsensusController]
    names = [c.name for c in classes]
    assert len(set(names)) == len(names), names
    assert isinstance(make_controller("learned"), BudgetConditionedController)
    path = tmp_path / "anee.pt"
    torch.save({f"net.{k}": v for k, v in ANEEMLPController().net.state_dict().items()}, path)
    assert make_controller(str(path)).name == "anee-mlp"
    for name in CONTROLLER_NAMES:
        make_controller(name)
    with pytest.raises(ValueError, match=", ".join(CONTROLLER_NAMES)):
        make_controller("anee")


def test_confidence_heuristic_runs_in_the_engine():
    """The LM-head readout the policy offers reaches controllers inside the engine."""
    llm = LLM(build_model("llama_gqa"), min_layers=1)
    ids = list(range(3, 20))
    _, never = llm.score(ids, controller=HeuristicController(confidence=1.1), return_trace=True)
    _, always = llm.score(ids, controller=HeuristicController(confidence=0.0), return_trace=True)
    assert (never.actions == PROCESS).all()
    assert (always.actions[:, 1:] == EXIT).all() and (always.actions[:, 0] == PROCESS).all()


def test_requests_naming_a_controller_share_one_instance(tmp_path):
    """So a batch of requests naming one controller runs it once per layer, not once per request."""
    assert make_controller("heuristic") is make_controller("heuristic")
    llm = LLM(build_model("llama_gqa"), min_layers=1)
    seqs = [llm.engine.new_sequence([5, 6, 7], SamplingParams(max_tokens=1), 0.5, "budget")
            for _ in range(3)]
    assert len({id(s.controller) for s in seqs}) == 1
    path = tmp_path / "anee.pt"
    torch.save({f"net.{k}": v for k, v in ANEEMLPController().net.state_dict().items()}, path)
    first = make_controller(str(path))
    assert make_controller(str(path)) is first
    os.utime(path, ns=(0, 1))                   # a changed file is read again
    assert make_controller(str(path)) is not first
