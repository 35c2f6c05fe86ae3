"""`anee-fast generate` on a tiny random Llama with an offline-built tokenizer, in-process and as
the installed console script; bad arguments end with one clear line on stderr. The training
commands' options come from their config dataclasses; help texts list what is accepted."""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from anee_fast import cli
from anee_fast.control.registry import CONTROLLER_NAMES
from anee_fast.eval.evaluation import DEFAULT_CONTROLLERS
from anee_fast.ops.backends import BACKENDS
from anee_fast.training.controller_training import TrainConfig
from anee_fast.training.recurrent_training import RecurrentTrainConfig

PROMPT = "why is the sky blue"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
NUM_LAYERS = 2


def _tokenizer(chat: bool):
    """A small WordLevel tokenizer trained here, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["the sky is blue because air scatters blue light more than red light",
         "explain why the sea looks blue on a sunny day",
         "user assistant system hello world , ."],
        trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _save_model(folder, chat=True):
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = _tokenizer(chat)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                         num_hidden_layers=NUM_LAYERS, num_attention_heads=6, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def generate_args(model_dir, *extra):
    return ["generate", PROMPT, "--model", model_dir, "--max-new-tokens", 8, "--ignore-eos",
            "--device", "cpu", *extra]


def check_trace(record):
    """The JSON's actions/compute agree with each other and with the budget rule: the prompt's
    tokens with prompt_budget, the generated ones with budget. Returns the generated tokens'
    actions and compute (the prompt's are checked here)."""
    L = record["num_layers"]
    actions = torch.tensor(record["actions"])
    compute = torch.tensor(record["compute"])
    n_tokens = len(record["prompt_token_ids"]) + len(record["token_ids"]) - 1
    assert actions.shape == (n_tokens, L)
    assert compute.shape == (n_tokens,)
    assert set(actions.unique().tolist()) <= {0, 1, 2}
    processed = (actions == 0).sum(1).float()
    expected = (processed + (L - processed) * record["skip_cost"]) / L
    assert torch.allclose(compute, expected, atol=1e-5)
    n_prompt = record["num_prompt_tokens"]
    for part, budget in ((slice(0, n_prompt), record["prompt_budget"]),
                         (slice(n_prompt, None), record["budget"])):
        assert float(compute[part].max()) <= max(budget, record["floor"]) + 1e-5
    if record["prompt_budget"] == 1.0:                     # the prompt read at full depth
        assert (actions[:n_prompt] == 0).all()
    return actions[n_prompt:], compute[n_prompt:]


def test_generate_writes_text_summary_plots_and_json(model_dir, tokenizer, tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc, out, err = run_cli(capsys, *generate_args(
        model_dir, "--budget", 0.5, "--min-layers", 1,
        "--heatmap", out_dir / "heatmap.png", "--compute-plot", out_dir / "compute.png",
        "--depth-plot", out_dir / "plots" / "depth.png", "--json", out_dir / "run.json"))
    assert rc == 0, err
    record = json.loads((out_dir / "run.json").read_text())
    assert len(record["token_ids"]) == 8
    assert record["text"] == tokenizer.decode(record["token_ids"], skip_special_tokens=True)
    assert record["text"].strip()
    lines = out.splitlines()
    assert lines[0] == record["text"]                       # the text comes first
    assert any(line.startswith("layers run per token: mean ") and f"of {NUM_LAYERS}" in line
               for line in lines)
    assert any(line.startswith("compute spent: ") and "energy budget 50.0%" in line for line in lines)
    assert any(line.startswith("  prompt tokens 100.0% (prompt budget 100.0%), generated tokens ")
               for line in lines)
    assert any(line.startswith("compute saved: ") for line in lines)
    assert any(line.startswith("speed: 8 tokens in ") and line.endswith("(prefill included)")
               for line in lines)
    for name in ("heatmap.png", "compute.png", "plots/depth.png", "run.json"):
        path = out_dir / name
        assert path.stat().st_size > 0
        assert f"{path}" in out
    for name in ("heatmap.png", "compute.png", "plots/depth.png"):
        image = matplotlib.image.imread(out_dir / name)
        assert image.shape[0] > 50 and image.shape[1] > 50

    # The chat template wrapped the prompt, and its text was encoded without extra specials.
    assert record["chat"] is True
    templated = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                              add_generation_prompt=True, tokenize=False)
    assert record["prompt_token_ids"] == tokenizer.encode(templated, add_special_tokens=False)
    assert record["prompt_token_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert record["budget"] == 0.5 and record["prompt_budget"] == 1.0
    assert record["min_layers"] == 1
    assert record["num_prompt_tokens"] == len(record["prompt_token_ids"])
    actions, _ = check_trace(record)
    # min_layers=1 on 2 layers: layer 0 always runs; at budget 0.5 layer 1 never can.
    assert (actions[:, 0] == 0).all() and (actions[:, 1] != 0).all()
    n_prompt, n_traced = record["num_prompt_tokens"], len(record["compute"])
    assert record["summary"]["layers_run_mean"] == pytest.approx(
        (NUM_LAYERS * n_prompt + (n_traced - n_prompt)) / n_traced)
    assert record["summary"]["prompt_compute"] == 1.0
    assert record["summary"]["generated_compute"] == pytest.approx(
        sum(record["compute"][n_prompt:]) / (n_traced - n_prompt))
    assert record["summary"]["generated_tokens"] == 8


def test_budget_changes_the_work_done(model_dir, tmp_path, capsys):
    full, low = tmp_path / "full.json", tmp_path / "low.json"
    assert run_cli(capsys, *generate_args(model_dir, "--budget", 1, "--min-layers", 0,
                                          "--json", full))[0] == 0
    assert run_cli(capsys, *generate_args(model_dir, "--budget", 0, "--min-layers", 0,
                                          "--json", low))[0] == 0
    full, low = json.loads(full.read_text()), json.loads(low.read_text())
    a_full, c_full = check_trace(full)
    a_low, c_low = check_trace(low)
    assert (a_full == 0).all() and torch.allclose(c_full, torch.ones_like(c_full))
    assert not (a_low == 0).any()                          # budget 0: K/V fill only
    assert torch.allclose(c_low, torch.full_like(c_low, low["skip_cost"]), atol=1e-5)
    assert 0 < low["skip_cost"] < 1


def test_prompt_budget_sets_the_prompt_tokens_work(model_dir, tmp_path, capsys):
    path = tmp_path / "low.json"
    assert run_cli(capsys, *generate_args(model_dir, "--budget", 0, "--prompt-budget", 0,
                                          "--min-layers", 0, "--json", path))[0] == 0
    record = json.loads(path.read_text())
    assert record["prompt_budget"] == 0.0
    check_trace(record)
    compute = torch.tensor(record["compute"])
    assert torch.allclose(compute, torch.full_like(compute, record["skip_cost"]), atol=1e-5)


def test_no_chat_encodes_the_plain_prompt(model_dir, tokenizer, tmp_path, capsys):
    path = tmp_path / "plain.json"
    rc, out, err = run_cli(capsys, *generate_args(model_dir, "--no-chat", "--json", path,
                                                  "--temperature", 0.8, "--top-k", 5, "--seed", 3))
    assert rc == 0, err
    record = json.loads(path.read_text())
    assert record["chat"] is False
    assert record["prompt_token_ids"] == tokenizer.encode(PROMPT)
    assert record["sampling"] == {"max_new_tokens": 8, "temperature": 0.8, "top_k": 5, "seed": 3,
                                  "ignore_eos": True}
    check_trace(record)


def test_chat_is_off_without_a_template_and_cannot_be_forced(tmp_path, capsys):
    folder = _save_model(tmp_path / "plain_model", chat=False)
    path = tmp_path / "auto.json"
    rc, _, err = run_cli(capsys, *generate_args(folder, "--json", path))
    assert rc == 0, err
    assert json.loads(path.read_text())["chat"] is False
    rc, out, err = run_cli(capsys, *generate_args(folder, "--chat"))
    assert rc != 0 and out == ""
    assert "chat template" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, expected", [
    (["--budget", "1.5"], "energy_budget"),
    (["--budget", "nan"], "energy_budget"),
    (["--budget", "-0.1"], "energy_budget"),
    (["--prompt-budget", "2"], "--prompt-budget: prompt_budget must be a number in [0, 1]"),
    (["--controller", "nonsense"], "unknown controller"),
    (["--controller", "missing/ctrl.json"], "trained controller file not found"),
    (["--controller", "/nonexistent/ctrl.pt"], "not found"),
    (["--max-new-tokens", "-1"], "max_tokens"),
    (["--min-layers", "-1"], "--min-layers must be >= 0"),
    (["--device", "bogus"], "--device"),
    (["--backend", "bogus"], "unknown backend"),
    pytest.param(["--device", "cuda"], "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CUDA is available here")),
], ids=["budget>1", "budget-nan", "budget<0", "prompt-budget", "controller-name", "trained-no-file",
        "controller-file", "max-new-tokens", "min-layers", "device", "backend", "no-cuda"])
def test_bad_arguments_exit_with_one_clear_line(model_dir, capsys, extra, expected):
    rc, out, err = run_cli(capsys, "generate", PROMPT, "--model", model_dir, *extra)
    assert rc != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anee-fast: error: ")
    assert expected in lines[0] and "Traceback" not in err


def test_missing_model_is_a_clear_error(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "generate", PROMPT, "--model", "/nonexistent")
    assert rc != 0 and out == ""
    assert err.strip() == ("anee-fast: error: --model: /nonexistent does not exist (give a model "
                           "directory, a .gguf file or a hub id)")
    # An existing folder that holds no model: the loader's error, still on one line.
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = run_cli(capsys, "generate", PROMPT, "--model", empty)
    assert rc != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and str(empty) in err


def test_usage_errors_return_nonzero(capsys):
    assert cli.main([]) != 0                               # no subcommand: help on stderr
    assert "generate" in capsys.readouterr().err
    assert cli.main(["generate"]) == 2                     # argparse: missing prompt
    assert "prompt" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--budget", "half"]) == 2
    assert cli.main(["generate", "--help"]) == 0
    assert "--compute-plot" in capsys.readouterr().out


def test_console_script_entry_point(model_dir, tmp_path):
    script = Path(sys.executable).with_name("anee-fast")
    assert script.is_file(), "entry point missing: pip install --no-deps --no-build-isolation -e ."
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("ANEE_FAST_DEBUG", None)
    ok = subprocess.run([str(script), "generate", PROMPT, "--model", model_dir, "--max-new-tokens",
                         "4", "--json", str(tmp_path / "sub.json")],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "layers run per token:" in ok.stdout and "tokens/s" in ok.stdout
    assert json.loads((tmp_path / "sub.json").read_text())["num_layers"] == NUM_LAYERS
    bad = subprocess.run([str(script), "generate", PROMPT, "--budget", "1.5"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "anee-fast: error: --budget: energy_budget must be a number in [0, 1], got 1.5"]


# ---- options made from the training dataclasses, and help texts --------------------------------

CONFIGS = [("train-controller", TrainConfig), ("train-recurrent", RecurrentTrainConfig)]


@pytest.mark.parametrize("command, cls", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_config_field_is_an_option_defaulting_to_the_dataclass(capsys, monkeypatch, command,
                                                                     cls):
    fields = dataclasses.fields(cls)
    args = cli.build_parser().parse_args([command, "out"])
    for f in fields:
        assert getattr(args, f.name) == f.default, f.name
    assert cli._config(cls, args) == cls()
    text = _help(capsys, monkeypatch, command)
    for f in fields:
        help_text = f.metadata["help"]
        assert help_text.strip(), f.name
        assert help_text in _option_help(text, f"--{f.name.replace('_', '-')}"), f.name


def test_a_config_field_without_help_is_refused():
    @dataclasses.dataclass
    class Config:
        seq_len: int = 64

    with pytest.raises(ValueError, match="Config.seq_len has no help"):
        cli._add_config_options(argparse.ArgumentParser(), Config)


def test_config_options_parse_to_the_field_types():
    args = cli.build_parser().parse_args([
        "train-controller", "out", "--corpus", "corpus", "--seq-len", "8", "--margin", "3",
        "--rank", "16", "--proj-dim", "4"])
    assert cli._config(TrainConfig, args) == TrainConfig(corpus="corpus", seq_len=8, margin=3.0,
                                                         rank=16, proj_dim=4)


@pytest.mark.parametrize("command, flags, expected", [
    ("train-controller", ["--seq-len", "0"], "seq_len must be an integer >= 1, got 0"),
    ("train-controller", ["--min-budget", "1.5"], "min_budget must be in [0, 1), got 1.5"),
    ("train-recurrent", ["--policy-share", "2"], "policy_share must be in [0, 1], got 2.0"),
], ids=["seq-len", "min-budget", "policy-share"])
def test_bad_training_values_exit_with_one_clear_line(capsys, tmp_path, command, flags, expected):
    rc, out, err = run_cli(capsys, command, tmp_path / "out", *flags)
    assert rc == 1 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("anee-fast: error: ") and expected in line
    assert not (tmp_path / "out").exists()                 # rejected before any work


@pytest.mark.parametrize("argv, expected", [
    (["train-controller", "out", "--seq-len", "many"], "argument --seq-len: invalid int value"),
    (["train-controller", "out", "--rank", "1.5"], "argument --rank: invalid int value"),
], ids=["int", "rank"])
def test_unparsable_training_values_are_usage_errors(capsys, argv, expected):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert expected in err.strip().splitlines()[-1]


def _help(capsys, monkeypatch, command) -> str:
    monkeypatch.setenv("COLUMNS", "1000")                  # one line per option: no wrapping
    assert cli.main([command, "--help"]) == 0
    return capsys.readouterr().out


def _option_help(text, option) -> str:
    """The option's entry in a --help text: its line and the indented lines below it."""
    entry = text.split(f"\n  {option} ", 1)[1]
    return entry.split("\n  -", 1)[0]


@pytest.mark.parametrize("command", ["generate", "serve", "eval", "train-controller",
                                     "train-recurrent", "eval-recurrent"])
def test_help_shows_percent_signs_once(capsys, monkeypatch, command):
    text = _help(capsys, monkeypatch, command)
    assert "%%" not in text and "%(" not in text
    if command == "eval":
        assert "the last 20% of its windows" in text


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_controller_help_lists_every_registered_controller(capsys, monkeypatch, command):
    entry = _option_help(_help(capsys, monkeypatch, command), "--controller")
    for name in CONTROLLER_NAMES:
        assert name in entry
    assert "controller file path" in entry and "(default budget)" in entry


def test_eval_and_backend_help_list_what_is_accepted(capsys, monkeypatch):
    text = _help(capsys, monkeypatch, "eval")
    controllers = _option_help(text, "--controllers")
    for name in (*CONTROLLER_NAMES, *DEFAULT_CONTROLLERS):
        assert name in controllers
    backend = _option_help(text, "--backend")
    for name in (*BACKENDS, "auto"):
        assert name in backend


# ---- --threads on every subcommand that computes -------------------------------------------------

THREADED = ["generate", "serve", "eval", "train-controller", "train-recurrent", "eval-recurrent"]


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.delenv("ANEE_FAST_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _argv(command, *extra):
    """Just enough positional arguments for `command` to parse."""
    positional = {"generate": [PROMPT], "train-controller": ["out"], "train-recurrent": ["out"],
                  "eval-recurrent": ["out"]}
    return [command, *positional.get(command, []), *extra]


@pytest.mark.parametrize("command", THREADED)
def test_threads_option_is_on_every_computing_command(capsys, monkeypatch, command):
    entry = _option_help(_help(capsys, monkeypatch, command), "--threads")
    assert "$ANEE_FAST_THREADS" in entry
    assert cli.build_parser().parse_args(_argv(command, "--threads", "3")).threads == 3


@pytest.mark.parametrize("command", THREADED)
@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two"])
def test_bad_threads_is_a_usage_error(capsys, command, value):
    rc, out, err = run_cli(capsys, *_argv(command, "--threads", value))
    assert rc == 2 and out == ""
    assert f"argument --threads: must be an integer >= 1, got '{value}'" in err


def test_generate_runs_on_the_threads_asked_for(model_dir, capsys, restore_threads):
    torch.set_num_threads(1)
    rc, _, err = run_cli(capsys, *generate_args(model_dir, "--threads", 2))
    assert rc == 0, err
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("command", ["train-controller", "train-recurrent"])
def test_training_runs_on_the_threads_asked_for(model_dir, tmp_path, capsys, monkeypatch,
                                                restore_threads, command):
    """The option, else $ANEE_FAST_THREADS, is in force when training starts (training stubbed)."""
    seen = []

    def fake_training(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return {"timings_s": {}, "model_log": [], "parameters": 0,
                "selection": {"net_min_budget": 1.0, "net_max_budget": 1.0, "budgets": [], "kl_net": [], "kl_static": []}}

    monkeypatch.setattr(cli, "train_controller", fake_training)
    monkeypatch.setattr(cli, "train_recurrent", fake_training)
    argv = [command, tmp_path / "out"]
    if command == "train-controller":
        argv += ["--model", model_dir]
    torch.set_num_threads(1)
    assert run_cli(capsys, *argv, "--threads", 2)[0] == 0
    monkeypatch.setenv("ANEE_FAST_THREADS", "3")
    assert run_cli(capsys, *argv)[0] == 0
    assert seen == [2, 3]


def test_serve_passes_its_prompt_budget_to_the_app(model_dir, monkeypatch, capsys):
    """`serve --prompt-budget` is what a request without prompt_budget gets (default None: the
    request's energy budget); a bad value is one line before any model loads."""
    from anee_fast.serving import server
    seen = []
    monkeypatch.setattr(server, "serve", lambda llm, **kwargs: seen.append(kwargs))
    for extra, expected in (([], None), (["--prompt-budget", "1"], 1.0)):
        assert cli.main(["serve", "--model", str(model_dir), "--device", "cpu", *extra]) == 0
        assert seen[-1]["prompt_budget"] == expected and seen[-1]["energy_budget"] == 1.0
    capsys.readouterr()
    assert cli.main(["serve", "--prompt-budget", "-1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["anee-fast: error: --prompt-budget: prompt_budget must be a number in [0, 1], "
                   "got -1.0"]
