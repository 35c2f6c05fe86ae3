"""The train-controller recipe: a tiny run fits adapters, searches the static order, distils,
selects, checkpoints and resumes; bad settings are refused before any work."""
import json

import pytest
import torch
from conftest import build_model

from anee_fast import LLM
from anee_fast.control.trained import BudgetConditionedController
from anee_fast.model.adapters import load_adapters
from anee_fast.training.controller_training import (TrainConfig, best_band, resolved_precision,
                                                    train_controller)


def tiny_config(**changes):
    base = dict(seq_len=16, rank=3, ridge_windows=4, search_windows=2, search_len=8,
                search_width=2, steps=2, batch=2, select_windows=2, eval_windows=1,
                checkpoint_every=1, width=8, proj_dim=4, precision="fp32")
    return TrainConfig(**dict(base, **changes))


def test_a_tiny_training_run_fits_checkpoints_and_resumes(tmp_path):
    llm = LLM(build_model("llama_gqa", num_layers=6), min_layers=1)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(3, 101, (16,), generator=g).tolist() for _ in range(10)]
    out = tmp_path / "run"
    first = train_controller(llm, out, tiny_config(), progress=False, windows=windows)
    assert [e["step"] for e in first["distillation"]] == [0, 1]
    assert llm.weights.adapters is not None and llm.adapters_path is None
    ridge, _ = load_adapters(out / "ridge.json", 6, llm.spec.hidden_size)
    final, config = load_adapters(out, 6, llm.spec.hidden_size)
    assert config["rank"] == 3
    assert any(not torch.equal(a.down, b.down) for a, b in zip(ridge, final))     # distilled
    order = json.loads((out / "static_order.json").read_text())["order"]
    assert sorted(order) == llm.depth.decidable_layers
    saved = json.loads((out / "controller.json").read_text())
    assert saved["static_fallback"]["order"] == order and saved["adapters"] == "adapters.json"
    selection = saved["training"]["selection"]
    chosen = best_band(selection["budgets"], selection["kl_net"], selection["kl_static"])[:2]
    assert (selection["net_min_budget"], selection["net_max_budget"]) == chosen
    assert (saved["static_fallback"]["net_min_budget"],
            saved["static_fallback"]["net_max_budget"]) == chosen
    assert all(row["within_budget"] for row in first["heldout"])
    assert (out / "training_curve.png").stat().st_size > 0

    with pytest.raises(ValueError, match="resume"):
        train_controller(llm, out, tiny_config(), progress=False, windows=windows)
    longer = train_controller(llm, out, tiny_config(steps=3), resume=True, progress=False,
                              windows=windows)
    assert longer["distillation"][:2] == first["distillation"]        # resumed, not restarted
    assert [e["step"] for e in longer["distillation"]] == [0, 1, 2]
    # an unbroken 3-step run draws what the resumed one drew
    straight = train_controller(LLM(build_model("llama_gqa", num_layers=6), min_layers=1),
                                tmp_path / "straight", tiny_config(steps=3), progress=False,
                                windows=windows)
    for a, b in zip(longer["distillation"], straight["distillation"]):
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4)

    trained = LLM(build_model("llama_gqa", num_layers=6), min_layers=1, adapters=out)
    controller = BudgetConditionedController.load(out)
    _, trace = trained.score(windows[0], energy_budget=0.5, controller=controller,
                             return_trace=True)
    assert float(trace.compute.max()) <= trained.depth.effective_budget(0.5) + 1e-6


def test_the_static_order_is_searched_again_at_reorder_step_and_resumes_past_it(tmp_path):
    """At reorder_step the order is searched again with the adapters distilled so far; the
    controller falls back on that order, and a run resumed past it draws what an unbroken one
    draws."""
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(3, 101, (16,), generator=g).tolist() for _ in range(10)]
    model = build_model("llama_gqa", num_layers=6)
    straight = train_controller(LLM(model, min_layers=1), tmp_path / "straight",
                                tiny_config(steps=3, reorder_step=1), progress=False,
                                windows=windows)
    out = tmp_path / "straight"
    first = json.loads((out / "static_order.json").read_text())
    again = json.loads((out / "reorder.json").read_text())
    assert sorted(again["order"]) == sorted(first["order"])
    assert json.loads((out / "controller.json").read_text())["static_fallback"]["order"] == again["order"]
    assert "reorder" in straight["timings_s"]

    train_controller(LLM(model, min_layers=1), tmp_path / "resumed",
                     tiny_config(steps=2, reorder_step=1), progress=False, windows=windows)
    resumed = train_controller(LLM(model, min_layers=1), tmp_path / "resumed",
                               tiny_config(steps=3, reorder_step=1), resume=True, progress=False,
                               windows=windows)
    assert json.loads((tmp_path / "resumed" / "reorder.json").read_text())["order"] == again["order"]
    for a, b in zip(resumed["distillation"], straight["distillation"]):
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4)


def test_quantized_weights_train_through_their_float_copy_at_their_own_skip_cost(tmp_path):
    """The controller is trained for the weights it will run with (their SKIP cost sets the
    budgets, every score runs them); the gradients go through the float copy."""
    model = build_model("llama_gqa", num_layers=6)
    llm = LLM(model, min_layers=1, weights="int8")
    float_llm = LLM(model, min_layers=1)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(3, 101, (16,), generator=g).tolist() for _ in range(10)]
    with pytest.raises(ValueError, match="training runs through float weights"):
        train_controller(llm, tmp_path / "no-floats", tiny_config(), progress=False,
                         windows=windows)
    log = train_controller(llm, tmp_path / "run", tiny_config(), progress=False, windows=windows,
                           float_weights=float_llm.weights)
    assert llm.weights.adapters is not None and llm.weights.weight_format == "int8"
    float_llm.set_adapters(load_adapters(tmp_path / "run", 6, llm.spec.hidden_size)[0])
    assert llm.depth.skip_cost != pytest.approx(float_llm.depth.skip_cost)   # bytes differ
    assert all(row["within_budget"] for row in log["heldout"])


@pytest.mark.parametrize("kl_net, want", [
    ([1.5, 1.0, 0.8, 0.7, 0.5, 0.4], (0.7, 0.8)),     # the net wins at 0.7 and 0.8 only
    ([1.3, 1.1, 0.9, 0.8, 0.7, 0.3], (0.9, 1.0)),     # ... at 0.9 only: the band runs on to 1
    ([1.1, 0.9, 0.8, 0.7, 0.55, 0.3], (0.5, 1.0)),    # ... everywhere
    ([1.3, 1.1, 0.9, 0.8, 0.7, 0.4], (1.0, 1.0)),     # ... nowhere
    ([1.3, 1.1, 0.85, 0.8, 0.5, 0.4], (0.8, 0.8)),    # one gain outweighs a smaller loss by it
    # gains of 0.05 at 0.7 and 0.8, a loss of 0.05 at 0.75 between: three bands tie; of the two
    # with fewest budgets, the higher
    ([1.3, 1.1, 0.8, 0.8, 0.55, 0.4], (0.8, 0.8)),
])
def test_the_net_is_trusted_in_the_band_of_budgets_where_it_helps(kl_net, want):
    budgets = [0.5, 0.6, 0.7, 0.75, 0.8, 0.9]
    kl_static = [1.2, 1.0, 0.85, 0.75, 0.6, 0.35]
    low, high, total = best_band(budgets, kl_net, kl_static)
    assert (low, high) == want
    inside = [low <= b <= high or (high == 1.0 and b == budgets[-1] and low <= b)
              for b in budgets]
    assert total == pytest.approx(sum(n if i else s for i, n, s in zip(inside, kl_net, kl_static)))


def test_bf16_distillation_follows_the_float32_run_it_stands_in_for(tmp_path):
    """precision="bf16" only rounds the matrix products: the same draws give each step's KL
    within bfloat16's error of the float32 run's, and the log says which ran."""
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(3, 101, (16,), generator=g).tolist() for _ in range(10)]
    model = build_model("llama_gqa", num_layers=6)
    runs = {p: train_controller(LLM(model, min_layers=1), tmp_path / p,
                                tiny_config(steps=3, precision=p), progress=False,
                                windows=windows)
            for p in ("fp32", "bf16")}
    assert runs["bf16"]["precision"] == "bf16" and runs["fp32"]["precision"] == "fp32"
    for a, b in zip(runs["bf16"]["distillation"], runs["fp32"]["distillation"]):
        assert a["kl"] != b["kl"]                                    # bf16 did run
        assert a["kl"] == pytest.approx(b["kl"], rel=0.05, abs=1e-3)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it_and_an_emulated_bf16_warns(
        monkeypatch, native):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert resolved_precision("auto") == ("bf16" if native else "fp32")
    assert resolved_precision("fp32") == "fp32"
    if native:
        assert resolved_precision("bf16") == "bf16"
    else:
        with pytest.warns(UserWarning, match="no native bfloat16"):
            assert resolved_precision("bf16") == "bf16"


@pytest.mark.parametrize("changes, message", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(steps=-1), "steps must be an integer >= 0"),
    (dict(min_budget=1.0), "min_budget must be in [0, 1)"),
    (dict(lr_adapters=0.0), "lr_adapters must be > 0"),
    (dict(margin=-1.0), "margin must be >= 0"),
    (dict(steps=5, reorder_step=5), "reorder_step must be below steps=5"),
    (dict(precision="fp16"), "precision must be one of auto, bf16, fp32"),
])
def test_bad_training_settings_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message.replace("[", "\\[").replace("(", "\\(").replace(")", "\\)")):
        TrainConfig(**changes).validate()


@pytest.mark.parametrize("weights", ["auto", "int8"])
def test_the_command_line_trains_and_the_outputs_load(tmp_path, capsys, weights):
    from test_cli import _save_model
    from anee_fast import cli
    model = _save_model(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the sky is blue because air scatters blue light more than red light"] * 60))
    out = tmp_path / "run"
    small = ["--corpus", text, "--seq-len", 8, "--rank", 2, "--ridge-windows", 4, "--search-windows", 2,
             "--search-len", 8, "--search-width", 2, "--steps", 1, "--batch", 2, "--select-windows", 2,
             "--eval-windows", 1, "--min-layers", 0, "--weights", weights]
    rc = cli.main([str(a) for a in ["train-controller", out, "--model", model, *small]])
    printed = capsys.readouterr().out
    assert rc == 0 and "held-out text, budget 0.50" in printed and "the net is trusted " in printed
    rc = cli.main([str(a) for a in ["generate", "hello", "--model", model, "--adapters", out,
                                    "--controller", out, "--budget", 0.5, "--max-new-tokens", 3,
                                    "--min-layers", 0, "--weights", weights]])
    assert rc == 0 and "compute" in capsys.readouterr().out
