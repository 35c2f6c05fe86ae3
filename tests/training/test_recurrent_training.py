"""The modular-arithmetic task, halting heads and controllers, the training recipe and the
complexity-controlled evaluation, on tiny models (a smoke version of docs/recurrent.md's runs)."""
import json

import pytest
import torch

from anee_fast import LLM, PROCESS
import anee_fast.training.recurrent_training as rt
from anee_fast.cli import main
from anee_fast.control.halting import HaltingController, early_plan, load_controller, new_head
from anee_fast.eval.modular_task import IGNORE, ModularTask
from anee_fast.eval.recurrent_eval import (answer_iterations, fixed_depth_actions, interpolate, pearson,
                                      run_eval_recurrent, token_iterations)
from anee_fast.model.recurrent import RecurrentConfig, RecurrentTransformer
from anee_fast.training.recurrent_training import (RecurrentTrainConfig, depth_mask, exit_table,
                                          fit_halting_head, head_inputs, head_iterations,
                                          online_exit_distribution, policy_batch, train_recurrent,
                                          training_batch)

TINY = dict(hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=24, iterations=3,
            steps=4, batch=8, halting_examples=24, halting_steps=3, checkpoint_every=2,
            train_max_ops=2, policy_steps=4)


def running_values(words, modulus):
    """Running values of a chain "d0 op1 d1 op2 d2 ...", left to right."""
    value, values = int(words[0]), [int(words[0])]
    for op, digit in zip(words[1::2], words[2::2]):
        value = {"+": value + int(digit), "-": value - int(digit), "*": value * int(digit)}[op] % modulus
        values.append(value)
    return values


@pytest.mark.parametrize("modulus", [2, 5, 11])
def test_task_targets_are_the_running_values(modulus):
    task = ModularTask(modulus)
    g = torch.Generator().manual_seed(modulus)
    for num_ops in range(0, 7):
        for _ in range(20):
            prompt, targets = task.sample(num_ops, g)
            assert len(prompt) == len(targets) == task.prompt_length(num_ops)
            words = task.decode(prompt).split()
            assert words[0] == "<bos>" and words[-1] == "="
            symbols = words[1:-1]
            assert sum(s in "+-*" for s in symbols) == num_ops
            assert all(s in "+-*" for s in symbols[1::2])
            values = running_values(symbols, modulus)
            assert [task.vocab[t] for t in targets[1:-1:2]] == [str(v) for v in values]
            assert all(t == IGNORE for t in [targets[0], *targets[2:-1:2]])
            assert task.vocab[targets[-1]] == str(values[-1])


def test_task_batches_pad_on_the_right():
    task = ModularTask(5)
    ids, targets = task.batch([1, 4, 2], torch.Generator().manual_seed(0))
    assert ids.shape == targets.shape == (3, task.prompt_length(4))
    for row, n in enumerate((1, 4, 2)):
        end = task.prompt_length(n)
        assert ids[row, end - 1] == task.token_id("=")
        assert (ids[row, end:] == task.token_id("<pad>")).all()
        assert (targets[row, end:] == IGNORE).all()
        assert task.vocab[targets[row, end - 1]].isdigit()


@pytest.mark.parametrize("bad", [1, 0, 98, 2.5, True])
def test_task_rejects_bad_moduli(bad):
    with pytest.raises(ValueError, match="modulus"):
        ModularTask(bad)


def test_depth_mask_runs_prelude_and_coda_always():
    c = RecurrentConfig(vocab_size=11, hidden_size=8, num_heads=2, num_kv_heads=1, prelude=1,
                        block=2, iterations=3, coda=1)          # layers: P | 1 1 | 2 2 | 3 3 | C
    mask = depth_mask(c, torch.tensor([1, 2, 3]))
    assert mask.tolist() == [
        [True, True, True, False, False, False, False, True],
        [True, True, True, True, True, False, False, True],
        [True] * 8,
    ]


def test_training_batches_run_a_share_of_the_chains_at_full_depth():
    task = ModularTask(5)
    config = RecurrentTrainConfig(**TINY).model_config()
    g = torch.Generator().manual_seed(0)
    ids, targets, iterations = training_batch(task, config, 3, 200, 1.0, g)
    assert (iterations == config.iterations).all()
    ids, targets, iterations = training_batch(task, config, 3, 200, 0.0, g)
    assert iterations.min() == 1 and iterations.max() == config.iterations
    assert (iterations == config.iterations).all(-1).sum() < 5
    ops = (ids == task.token_id("+")) | (ids == task.token_id("-")) | (ids == task.token_id("*"))
    assert set(ops.sum(-1).tolist()) == {1, 2, 3}
    with pytest.raises(ValueError, match="full_depth_share"):
        RecurrentTrainConfig(full_depth_share=1.5).validate()


def _controller_for(kind, config, bias, compute_penalty=0.0):
    head = new_head(kind, config.hidden_size, config.iterations, width=4)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        last = head.net[-1] if kind == "early" else head.out
        last.bias.copy_(bias)
    return HaltingController(kind, head, config.prelude, config.block, config.iterations,
                             config.num_layers, config.hidden_size, compute_penalty)


@pytest.mark.parametrize("kind, bias, penalty, expected", [
    ("early", torch.tensor([5.0, 5.0, 0.0, 5.0]), 0.0, 3),   # predicted CE lowest after 3
    ("early", torch.tensor([0.0, 5.0, 5.0, 5.0]), 0.0, 1),
    ("early", torch.tensor([0.2, 0.0, 0.0, 0.0]), 0.0, 2),   # the fewest among equal CEs
    ("early", torch.tensor([0.2, 0.0, 0.0, 0.0]), 2.0, 1),   # compute outweighs 0.2 nats
    ("online", torch.tensor([5.0]), 0.0, 1),                 # halts after the first iteration
    ("online", torch.tensor([-5.0]), 0.0, 4),                # never halts: all R iterations
])
def test_halting_controllers_exit_at_iteration_boundaries(kind, bias, penalty, expected):
    torch.manual_seed(0)
    model = RecurrentTransformer(RecurrentConfig(vocab_size=11, hidden_size=8, num_heads=2,
                                                 num_kv_heads=1, intermediate_size=12, prelude=1,
                                                 block=2, iterations=4, coda=1)).eval()
    c = model.config
    llm = LLM(model, backend="reference", min_layers=c.prelude, always_last=c.coda)
    controller = _controller_for(kind, c, bias, penalty)
    _, traces = llm.score([[1, 4, 5, 6, 2], [1, 7]], controller=controller, return_trace=True)
    for trace in traces:
        assert answer_iterations(trace, c) == expected
        assert (token_iterations(trace, c) == expected).all()
        actions = trace.actions
        assert (actions[:, :c.iteration_end(expected)] == PROCESS).all()
        assert (actions[:, c.iteration_end(expected):c.num_layers - c.coda] != PROCESS).all()
        assert (actions[:, -c.coda:] == PROCESS).all()        # the coda still runs
    with pytest.raises(ValueError, match="virtual layers"):
        controller.check_model(c.num_layers + 1, c.hidden_size)
    with pytest.raises(ValueError, match="compute_penalty"):
        _controller_for(kind, c, bias, -1.0)


def test_online_exit_distribution_sums_to_one():
    torch.manual_seed(0)
    head = new_head("online", 8, 5)
    table = {"ce": torch.rand(7, 5), "states": torch.randn(7, 5, 8)}
    p = online_exit_distribution(head, table)
    assert p.shape == (7, 5) and (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(7))


def test_fitted_early_head_plans_the_cheapest_good_exit():
    """Two kinds of state: one is solved after 1 iteration, the other needs 3."""
    torch.manual_seed(0)
    n, R, hidden = 256, 4, 8
    kind = torch.arange(n) % 2
    states = torch.randn(n, hidden) * 0.1 + torch.where(kind[:, None] == 1, 1.0, -1.0)
    ce = torch.where(kind[:, None] == 1, torch.tensor([2.0, 1.0, 0.0, 0.0]), torch.zeros(R))
    table = {"ce": ce, "after_prelude": states, "states": states[:, None].expand(n, R, hidden)}
    config = RecurrentTrainConfig(halting_steps=300, halting_width=16, compute_penalty=0.4)
    head, log = fit_halting_head("early", table, config, progress=False)
    assert early_plan(head(states), 0.4).tolist() == (kind * 2 + 1).tolist()
    assert log[-1]["loss"] < log[0]["loss"] / 10
    assert log[-1]["expected_iterations"] == pytest.approx(2.0)


def test_exit_table_holds_every_token_at_every_depth():
    torch.manual_seed(0)
    config = RecurrentTrainConfig(**TINY)
    model = RecurrentTransformer(config.model_config()).eval()
    task = ModularTask(5)
    table = exit_table(model, task, 2, examples=5, g=torch.Generator().manual_seed(1))
    n = table["ce"].shape[0]
    assert 5 * task.prompt_length(1) <= n <= 5 * task.prompt_length(2)
    assert table["ce"].shape == (n, 3) and table["states"].shape == (n, 3, 16)
    assert table["after_prelude"].shape == (n, 16)
    assert int(table["answer"].sum()) == 5
    # The "=" rows hold the answer's cross-entropy after r iterations of every token.
    ids, targets, _ = training_batch(task, model.config, 2, 5, 1.0, torch.Generator().manual_seed(1))
    answer = ids == task.token_id("=")
    for r in (1, 3):
        logits = model(ids, depth_mask(model.config, torch.full(ids.shape, r)))
        expected = torch.nn.functional.cross_entropy(logits[answer], targets[answer], reduction="none")
        torch.testing.assert_close(table["ce"][table["answer"], r - 1], expected)
    assert not torch.equal(table["ce"][:, 0], table["ce"][:, 2])   # depth changes the answer
    untargeted = (table["ce"] == 0).all(-1)
    assert untargeted.sum() >= 5 * 2                                # <bos> and the operators


def _random_heads(config, seed):
    torch.manual_seed(seed)
    return {kind: new_head(kind, config.hidden_size, config.iterations, 8).eval()
            for kind in ("early", "online")}


def test_head_iterations_follow_each_head_from_full_depth_states():
    torch.manual_seed(0)
    config = RecurrentTrainConfig(**dict(TINY, iterations=5))
    model = RecurrentTransformer(config.model_config()).eval()
    task = ModularTask(5)
    ids, _ = task.batch([1, 3, 2], torch.Generator().manual_seed(0))
    for seed in range(4):
        heads = _random_heads(config, seed)
        with torch.no_grad():
            for p in heads["online"].out.parameters():
                p.add_(torch.randn_like(p))             # halt at varied iterations
        picked = head_iterations(model, heads, ids, compute_penalty=0.3)
        hidden = []
        model(ids, hidden_states=hidden)
        c = model.config
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                predicted = heads["early"](hidden[c.prelude - 1][b, t])
                cost = 0.3 * torch.arange(1, 6) / 5
                assert picked["early"][b, t] == int((predicted + cost).argmin()) + 1
                expected = 5                            # the first r < R whose logit is positive
                for r in range(1, 5):
                    if heads["online"](hidden[c.iteration_end(r) - 1][b, t], torch.tensor(r)) > 0:
                        expected = r
                        break
                assert picked["online"][b, t] == expected
    after_prelude, states = head_inputs(model, ids)
    assert states.shape == (*ids.shape, 5, 16)
    torch.testing.assert_close(states[..., -1, :], hidden[c.iteration_end(5) - 1])


@pytest.mark.parametrize("share", [0.0, 1.0, 0.5])
def test_policy_batches_give_a_share_of_the_chains_to_the_heads(share):
    torch.manual_seed(0)
    config = RecurrentTrainConfig(**dict(TINY, iterations=6, batch=64, policy_share=share))
    model = RecurrentTransformer(config.model_config()).eval()
    task = ModularTask(5)
    heads = _random_heads(config, 1)
    ids, targets, iterations = policy_batch(model, heads, task, config, torch.Generator().manual_seed(3))
    plain = training_batch(task, model.config, config.train_max_ops, config.batch,
                           config.full_depth_share, torch.Generator().manual_seed(3))
    assert torch.equal(ids, plain[0]) and torch.equal(targets, plain[1])
    picked = head_iterations(model, heads, ids, config.compute_penalty)
    as_plain = (iterations == plain[2]).all(-1)
    as_head = [(iterations == picked[kind]).all(-1) for kind in ("early", "online")]
    assert (as_plain | as_head[0] | as_head[1]).all()
    differs = ~as_plain
    if share == 0.0:
        assert not differs.any()
    else:
        assert differs.sum() >= (20 if share == 1.0 else 8)
        assert (differs & as_head[0]).any() and (differs & as_head[1]).any()
    with pytest.raises(ValueError, match="policy_share"):
        RecurrentTrainConfig(policy_share=-0.1).validate()
    with pytest.raises(ValueError, match="policy_steps"):
        RecurrentTrainConfig(policy_steps=-1).validate()


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.mark.parametrize("failing_call, stage_ckpt, saved_step", [
    (3, "checkpoint.pt", 2),            # interrupted in the model stage
    (7, "policy_checkpoint.pt", 2),     # interrupted in on-policy fine-tuning (steps 5..8)
])
def test_training_writes_resumes_and_evaluates(tmp_path, monkeypatch, failing_call, stage_ckpt,
                                               saved_step):
    out = tmp_path / "run"
    calls, real_loss = [], rt.token_loss

    def failing_loss(*args):
        calls.append(1)
        if len(calls) == failing_call:
            raise RuntimeError("interrupted")
        return real_loss(*args)
    monkeypatch.setattr(rt, "token_loss", failing_loss)
    with pytest.raises(RuntimeError, match="interrupted"):
        train_recurrent(out, RecurrentTrainConfig(**TINY), progress=False)
    monkeypatch.setattr(rt, "token_loss", real_loss)
    assert torch.load(out / stage_ckpt, weights_only=False)["step"] == saved_step
    with pytest.raises(ValueError, match="already holds a training run"):
        train_recurrent(out, RecurrentTrainConfig(**TINY), progress=False)
    with pytest.raises(ValueError, match="other settings"):
        train_recurrent(out, RecurrentTrainConfig(**dict(TINY, steps=6)), resume=True, progress=False)
    log = train_recurrent(out, RecurrentTrainConfig(**TINY), resume=True, progress=False)
    for name in ("recurrent_config.json", "model.safetensors", "halting-early.safetensors",
                 "halting-online.safetensors", "halting.json", "checkpoint.pt",
                 "policy_checkpoint.pt", "training_log.json", "training_curve.png"):
        assert (out / name).is_file(), name
    assert [e["step"] for e in log["model_log"]] == [4]
    assert [e["step"] for e in log["policy_log"]] == [4]
    assert set(log["timings_s"]) == {"model", "halting", "policy", "refit"}
    assert len(log["exit_ce_by_iteration"]) == 3
    # The resumed run ends with the model and heads of an unbroken one, and fine-tuning moved
    # the model.
    unbroken = tmp_path / "unbroken"
    train_recurrent(unbroken, RecurrentTrainConfig(**TINY), progress=False)
    for name in ("model.safetensors", "halting-early.safetensors", "halting-online.safetensors"):
        a, b = _weights(out / name), _weights(unbroken / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    stage1 = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    final = _weights(out / "model.safetensors")
    assert any(not torch.equal(stage1[k], final[k]) for k in stage1 if k in final)

    llm = LLM(str(out), backend="reference", min_layers=1, always_last=1)
    controller = load_controller(out, "online")
    assert llm.score([1, 5, 8, 2], controller=controller).shape == (4, ModularTask(5).vocab_size)

    result = run_eval_recurrent(out, max_ops=3, examples=4, backend="reference",
                                json_path=tmp_path / "e" / "eval.json", plot_path=tmp_path / "e" / "eval.png",
                                progress=False, out=open(tmp_path / "table.txt", "w"))
    names = {r["controller"] for r in result["records"]}
    assert names == {"halting-early", "halting-online", "fixed-1", "fixed-2", "fixed-3"}
    assert len(result["records"]) == 5 * 3
    for r in result["records"]:
        if r["controller"].startswith("fixed-"):
            assert r["mean_iterations"] == r["mean_token_iterations"] == int(r["controller"][6:])
        assert 1.0 <= r["mean_token_iterations"] <= 3.0
        assert r["in_range"] == (r["num_ops"] <= 2)
        assert 0.0 <= r["accuracy"] <= 1.0
    assert set(result["summary"]) == {"halting-early", "halting-online"}
    assert [k for k, _ in result["fixed_depth_in_range"]] == [1, 2, 3]
    for k, accuracy in result["fixed_depth_in_range"]:
        in_range = [r["accuracy"] for r in result["records"]
                    if r["controller"] == f"fixed-{int(k)}" and r["in_range"]]
        assert accuracy == pytest.approx(sum(in_range) / len(in_range))
    for s in result["summary"].values():
        assert 1.0 <= s["mean_token_iterations_in_range"] <= 3.0
        assert 0.0 <= s["fixed_depth_accuracy_at_same_token_iterations"] <= 1.0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["summary"] == result["summary"]
    assert (tmp_path / "e" / "eval.png").stat().st_size > 1000


def test_fixed_depth_actions_and_helpers():
    c = RecurrentConfig(vocab_size=11, hidden_size=8, num_heads=2, num_kv_heads=1, prelude=1,
                        block=2, iterations=3, coda=1)
    assert fixed_depth_actions(c, 2) == [PROCESS] * 5 + [2] * 3
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) is None          # undefined: no variance
    assert interpolate([(1.0, 0.2), (3.0, 0.6)], 2.0) == pytest.approx(0.4)
    assert interpolate([(1.0, 0.2), (3.0, 0.6)], 0.5) == 0.2


def test_cli_train_and_eval_recurrent(tmp_path, capsys):
    out = str(tmp_path / "cli")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in dict(TINY, policy_steps=0).items()]
    assert main(["train-recurrent", out, *flags]) == 0
    assert "halting heads" in capsys.readouterr().out
    log = json.loads((tmp_path / "cli" / "training_log.json").read_text())
    assert set(log["timings_s"]) == {"model", "halting"} and "policy_log" not in log
    assert not (tmp_path / "cli" / "policy_checkpoint.pt").exists()
    assert main(["eval-recurrent", out, "--max-ops", "2", "--examples", "2", "--backend", "reference",
                 "--no-progress"]) == 0
    assert "corr(answer iterations, L)" in capsys.readouterr().out
    assert main(["train-recurrent", str(tmp_path / "bad"), "--modulus", "1"]) == 1
    assert "modulus" in capsys.readouterr().err
    assert main(["eval-recurrent", str(tmp_path / "missing")]) == 1
    assert "train-recurrent" in capsys.readouterr().err
    assert main(["eval-recurrent", out, "--max-ops", "0"]) == 1
