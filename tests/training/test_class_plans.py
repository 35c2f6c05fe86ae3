"""Per-token-class plans (training/class_plans.py) and the trained controller that falls back to them."""
import json

import pytest
import torch
from conftest import build_model

from anee_fast import LLM, PROCESS, SKIP
from anee_fast.training.class_plans import fit_class_plans, layer_residuals
from anee_fast.training.controller_traces import processable_layers
from anee_fast.eval.quality import full_logits
from anee_fast.control.trained import BudgetConditionedController, nearest
from anee_fast.eval.category_router import kmeans

L = 6
ORDER = [4, 1, 3, 5, 2]          # decidable layers (min_layers=1), the first to skip first


def windows(count=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 101, (length,), generator=g).tolist() for _ in range(count)]


def planned_controller(llm, classes=3, margin=1e9, seed=0):
    """A controller that always falls back (margin 1e9) to class plans fitted here by hand."""
    torch.manual_seed(seed)
    c = BudgetConditionedController.new(L, llm.spec.hidden_size, "tiny llama_gqa", width=8, proj_dim=4)
    x = layer_residuals(llm, windows(), layer=1)
    c.net.register_buffer("class_centroids", kmeans(x, classes, seed=seed))
    depth = llm.depth
    n = len(ORDER) - processable_layers(0.5, L, depth.skip_cost, 1, 0)
    rotations = [sorted((ORDER[i:] + ORDER[:i])[:n]) for i in range(classes)]   # distinct plans
    c.config["static_fallback"] = {"order": ORDER, "margin": margin}
    c.config["class_plans"] = {"layer": 1, "classes": classes, "plans": {str(n): rotations}}
    return c, n, rotations


def test_each_token_follows_its_class_plan_and_other_budgets_the_static_set(tmp_path):
    llm = LLM(build_model("llama_gqa", num_layers=L), min_layers=1, block_size=4)
    controller, n, plans = planned_controller(llm)
    ids = windows(1, 30, seed=3)[0]
    classes = nearest(layer_residuals(llm, [ids], layer=1), controller.net.class_centroids)
    assert len(set(classes.tolist())) > 1                 # the test text spans several classes
    _, trace = llm.score(ids, energy_budget=0.5, controller=controller, return_trace=True)
    for t, c in enumerate(classes.tolist()):
        assert (trace.actions[t] == SKIP).nonzero().squeeze(1).tolist() == plans[c]
    # token by token (decode steps) gives the same actions
    _, stepwise = llm.score(ids, energy_budget=0.5, controller=controller, chunk_size=1,
                            return_trace=True)
    assert torch.equal(stepwise.actions, trace.actions)
    # a budget whose skip count has no plan follows the static set
    depth = llm.depth
    k = processable_layers(0.8, L, depth.skip_cost, 1, 0)
    assert len(ORDER) - k != n
    _, other = llm.score(ids, energy_budget=0.8, controller=controller, return_trace=True)
    static = [SKIP if layer in ORDER[:len(ORDER) - k] else PROCESS for layer in range(L)]
    assert (other.actions == torch.tensor(static, dtype=torch.int8)).all()
    # the plans and centroids survive saving
    loaded = BudgetConditionedController.load(controller.save(tmp_path / "planned"))
    assert torch.equal(loaded.net.class_centroids, controller.net.class_centroids)
    _, again = llm.score(ids, energy_budget=0.5, controller=loaded, return_trace=True)
    assert torch.equal(again.actions, trace.actions)


def test_bad_class_plans_fail_to_load(tmp_path):
    llm = LLM(build_model("llama_gqa", num_layers=L), min_layers=1)
    controller, n, plans = planned_controller(llm)
    path = controller.save(tmp_path / "planned")
    good = json.loads(path.read_text())
    cases = [
        ({"static_fallback": None}, "need a static_fallback"),
        ({"class_plans": dict(good["class_plans"], layer=0)}, "class_plans.layer"),
        ({"class_plans": dict(good["class_plans"], plans={str(n): plans[:2]})}, "must hold 3 lists"),
        ({"class_plans": dict(good["class_plans"], plans={str(n): [[0] * n] * 3})}, "must hold 3 lists"),
        ({"class_plans": dict(good["class_plans"], classes=4, plans={str(n): plans + plans[:1]})},
         "weights do not match"),                  # 4 classes, 3 centroids in the weights
    ]
    for change, message in cases:
        bad = dict(good, **change)
        if bad["static_fallback"] is None:
            del bad["static_fallback"]
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            BudgetConditionedController.load(path)


def test_fitted_plans_keep_the_skip_count_and_never_raise_the_training_kl():
    llm = LLM(build_model("llama_gqa", num_layers=L), min_layers=1, block_size=4)
    train = windows(4, 12, seed=5)
    full = full_logits(llm, train, progress=False)
    fitted = fit_class_plans(llm, train, full, ORDER, [2, 3], classes=3, candidates=2, layer=1,
                             progress=False)
    assert fitted["centroids"].shape == (3, llm.spec.hidden_size)
    for n in (2, 3):
        assert len(fitted["plans"][n]) == 3
        assert all(len(p) == n and set(p) <= set(ORDER) for p in fitted["plans"][n])
    for entry in fitted["log"]:
        assert entry["train_kl"] <= entry["static_kl"]
        kls = [s["kl"] for s in entry["swaps"]]
        assert kls == sorted(kls, reverse=True) and all(k < entry["static_kl"] for k in kls)
    with pytest.raises(ValueError, match="decidable"):
        fit_class_plans(llm, train, full, ORDER, [2], classes=2, layer=0, progress=False)


@pytest.mark.cuda
def test_class_plans_replay_from_cuda_graphs_as_on_the_cpu():
    model = build_model("llama_gqa", num_layers=L)
    cpu = LLM(model, min_layers=1, block_size=4, device="cpu")
    controller, n, plans = planned_controller(cpu)
    gpu = LLM(model, min_layers=1, block_size=4, device="cuda", dtype=torch.float32)
    ids = windows(1, 30, seed=3)[0]
    # chunk_size=1: every step decodes one token per sequence, so the steps replay CUDA graphs
    _, want = cpu.score(ids, energy_budget=0.5, controller=controller, chunk_size=1, return_trace=True)
    _, got = gpu.score(ids, energy_budget=0.5, controller=controller, chunk_size=1, return_trace=True)
    assert gpu.engine.runner.graphs.graphs
    assert torch.equal(got.actions, want.actions)
