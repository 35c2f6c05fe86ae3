"""Controller training: the oracle teacher keeps the budget, and a tiny run trains and resumes."""
import json

import pytest
import torch
from conftest import build_model

from anee_fast import LLM, PROCESS, SKIP
from anee_fast.training.controller_traces import decidable_layers, oracle_actions, processable_layers
from anee_fast.training.controller_training import TrainConfig, train_controller
from anee_fast.control.depth_policy import DepthAccounting
from anee_fast.control.trained import BudgetConditionedController

L, SKIP_COST, MIN_LAYERS = 12, 0.0626, 2


def compute_of(actions):
    """Fraction of a full forward an action matrix spends per token [T]."""
    return ((actions == PROCESS).float() + (actions != PROCESS).float() * SKIP_COST).mean(1)


@pytest.mark.parametrize("budget", [1.0, 0.8, 0.5, 0.3, 0.0])
def test_oracle_labels_keep_the_budget_and_take_the_most_sensitive_layers(budget):
    torch.manual_seed(0)
    sens = torch.rand(20, L)
    acts = oracle_actions(sens, budget, SKIP_COST, MIN_LAYERS)
    limit = max(budget, DepthAccounting(L, SKIP_COST, MIN_LAYERS, 0).floor)
    assert (compute_of(acts) <= limit + 1e-6).all()
    assert (acts[:, :MIN_LAYERS] == PROCESS).all()
    k = processable_layers(budget, L, SKIP_COST, MIN_LAYERS, 0)
    # one more processed layer would not fit: the oracle spends what it may
    assert (compute_of(acts) + (1 - SKIP_COST) / L > limit + 1e-6).all() or k == L - MIN_LAYERS
    free = sens[:, MIN_LAYERS:]
    ran = acts[:, MIN_LAYERS:] == PROCESS
    assert (ran.sum(1) == k).all()
    if 0 < k < L - MIN_LAYERS:   # every processed layer is at least as sensitive as every skipped one
        assert (free.masked_fill(~ran, float("inf")).min(1).values
                >= free.masked_fill(ran, -float("inf")).max(1).values).all()


def test_oracle_with_a_base_order_swaps_only_past_the_margin():
    layers = decidable_layers(L, MIN_LAYERS, 0)
    order = list(reversed(layers))               # skip the last layers first
    sens = torch.full((3, L), 1.0)
    sens[1, layers[0]] = 0.1                     # token 1: a processed layer that hardly matters...
    sens[1, layers[-1]] = 5.0                    # ...and a skipped one that matters a lot
    sens[2, layers[0]] = 0.8                     # token 2: a difference under the margin
    sens[2, layers[-1]] = 1.5
    acts = oracle_actions(sens, 0.5, SKIP_COST, MIN_LAYERS, order=order, max_swaps=1, margin=2.0)
    k = processable_layers(0.5, L, SKIP_COST, MIN_LAYERS, 0)
    base = torch.full((L,), PROCESS, dtype=torch.int8)
    base[order[:len(layers) - k]] = SKIP
    assert torch.equal(acts[0], base) and torch.equal(acts[2], base)
    assert acts[1, layers[-1]] == PROCESS and acts[1, layers[0]] == SKIP
    assert (acts[1] == PROCESS).sum() == (base == PROCESS).sum()
    with pytest.raises(ValueError, match="every decidable layer"):
        oracle_actions(sens, 0.5, SKIP_COST, MIN_LAYERS, order=order[1:])


def tiny_config(**changes):
    base = dict(seq_len=16, trace_windows=3, trace_budgets=3, order_windows=2, order_stop_budget=0.3,
                warm_epochs=4, rl_windows=3, rl_steps=1, rl_batch=2, eval_windows=1,
                checkpoint_every=1, width=8, proj_dim=4)
    return TrainConfig(**dict(base, **changes))


def test_a_tiny_training_run_learns_checkpoints_and_resumes(tmp_path):
    llm = LLM(build_model("llama_gqa", num_layers=6), min_layers=1)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(3, 101, (16,), generator=g).tolist() for _ in range(6)]
    out = tmp_path / "run"
    first = train_controller(llm, out, tiny_config(), progress=False, windows=windows)
    warm = [e["loss"] for e in first["warm_start"]]
    assert warm[-1] < warm[0]                          # the warm start fits its teacher
    assert len(first["reinforce"]) == 1 and first["reinforce"][0]["loss"] is not None
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 1
    warm_net = torch.load(out / "warm.pt", weights_only=False)["net"]
    assert any(not torch.equal(warm_net[k], ckpt["net"][k]) for k in warm_net)   # RL moved it

    with pytest.raises(ValueError, match="resume"):
        train_controller(llm, out, tiny_config(), progress=False, windows=windows)
    # a resumed run (warm start read back from disk) selects as the fresh run did
    again = train_controller(llm, out, tiny_config(), resume=True, progress=False, windows=windows)
    assert again["selection"] == first["selection"]
    second = train_controller(llm, out, tiny_config(rl_steps=2, fallback_margin=0.5), resume=True,
                              progress=False, windows=windows)
    assert second["reinforce"][0] == first["reinforce"][0]     # resumed, not restarted
    assert [e["step"] for e in second["reinforce"]] == [1, 2]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2

    config = json.loads((out / "controller.json").read_text())
    assert config["training"]["recipe"]["rl_steps"] == 2
    order = torch.load(out / "traces.pt", weights_only=False)["order"]
    assert config["static_fallback"] == {"order": order, "margin": 0.5}
    selection = config["training"]["selection"]
    assert selection["mean_kl"][selection["kept"]] == min(selection["mean_kl"].values())
    assert all(row["within_budget"] for row in config["training"]["heldout"])
    assert (out / "training_curve.png").stat().st_size > 0
    controller = BudgetConditionedController.load(out)
    _, trace = llm.score(windows[0], energy_budget=0.5, controller=controller, return_trace=True)
    depth = llm.depth
    assert float(trace.compute.max()) <= max(0.5, DepthAccounting(6, depth.skip_cost, 1, 0).floor) + 1e-6


def test_class_plans_join_the_saved_controller(tmp_path):
    llm = LLM(build_model("llama_gqa", num_layers=6), min_layers=1)
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(3, 101, (16,), generator=g).tolist() for _ in range(6)]
    out = tmp_path / "run"
    config = tiny_config(fallback_margin=3.0, class_budgets=(0.5,), classes=2, class_candidates=1,
                         class_windows=3, rl_steps=0)
    log = train_controller(llm, out, config, progress=False, windows=windows)
    saved = json.loads((out / "controller.json").read_text())
    plans = saved["class_plans"]
    assert plans["layer"] == 1 and plans["classes"] == 2
    depth = llm.depth
    n = 5 - processable_layers(0.5, 6, depth.skip_cost, 1, 0)
    assert list(plans["plans"]) == [str(n)] and all(len(p) == n for p in plans["plans"][str(n)])
    assert log["class_plans"][0]["train_kl"] <= log["class_plans"][0]["static_kl"]
    assert "class_plans" in log["timings_s"]
    controller = BudgetConditionedController.load(out)
    assert controller.net.class_centroids.shape == (2, llm.spec.hidden_size)
    again = train_controller(llm, out, config, resume=True, progress=False, windows=windows)
    assert again["class_plans"] == log["class_plans"]            # read back, not refitted


def test_bad_training_settings_are_rejected():
    with pytest.raises(ValueError, match="teacher"):
        TrainConfig(teacher="nobody").validate()
    with pytest.raises(ValueError, match="rl_batch"):
        TrainConfig(rl_batch=0).validate()
    with pytest.raises(ValueError, match="order_stop_budget"):
        TrainConfig(order_stop_budget=1.5).validate()
    with pytest.raises(ValueError, match="fallback_margin"):
        TrainConfig(fallback_margin=-1.0).validate()
    with pytest.raises(ValueError, match="set fallback_margin too"):
        TrainConfig(class_budgets=(0.5,)).validate()
    with pytest.raises(ValueError, match="class_budgets"):
        TrainConfig(class_budgets=(1.5,), fallback_margin=3.0).validate()


def test_the_command_line_trains_and_rejects_bad_settings(tmp_path, capsys):
    from test_cli import _save_model
    from anee_fast import cli
    model = _save_model(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the sky is blue because air scatters blue light more than red light"] * 40))
    out = tmp_path / "run"
    small = ["--text", text, "--seq-len", 8, "--trace-windows", 2, "--trace-budgets", 2,
             "--order-windows", 1, "--order-stop-budget", 0.3, "--warm-epochs", 1, "--rl-windows", 2,
             "--rl-steps", 1, "--rl-batch", 2, "--eval-windows", 1, "--min-layers", 0]
    rc = cli.main([str(a) for a in ["train-controller", out, "--model", model, *small]])
    printed = capsys.readouterr().out
    assert rc == 0 and "held-out budget 0.50" in printed
    assert BudgetConditionedController.load(out).config["training"]["recipe"]["seq_len"] == 8
    rc = cli.main(["train-controller", str(tmp_path / "other"), "--model", model, "--teacher", "x"])
    err = capsys.readouterr().err
    assert rc == 1 and "teacher must be one of" in err and len(err.strip().splitlines()) == 1
