"""Complexity-controlled evaluation of halting on a weight-tied model.

For each number of operators L (including L beyond the training range) fresh examples are run
through the engine with each controller: early allocation, online halting, and fixed depth k
(every token runs k iterations) for k = 1..R. Per (controller, L): answer accuracy, mean
iterations of the answer token (the "=" token, whose logits give the answer) and mean iterations
per token of the whole example (its compute: the answer reads every context token's K/V, and
fixed depth k runs every token k times). Summary per halting controller: the Pearson correlation
between the answer's iterations and L over in-range examples, and its in-range accuracy next to
fixed depth's at the same mean answer iterations and at the same mean iterations per token
(fixed depth's accuracy interpolated linearly between the two nearest k).
"""
import json
import os
import sys
import time
from typing import NamedTuple

import torch

from ..actions import EXIT, PROCESS
from ..control.halting import KINDS, load_controller
from ..model import recurrent as recurrent_model
from .modular_task import ModularTask
from .quality import score_windows
from .report import report


class Outcome(NamedTuple):
    """One example under one controller."""
    num_ops: int
    answer_iterations: int
    tokens: int
    token_iterations: int       # summed over every token of the example
    correct: bool


def fixed_depth_actions(config, k: int) -> list:
    """The per-layer action list of "k iterations, then halt" (the coda still runs when
    always_last = coda)."""
    end = config.iteration_end(k)
    return [PROCESS] * end + [EXIT] * (config.num_layers - end)


def token_iterations(trace, config) -> torch.Tensor:
    """Iterations every token of a scored prompt ran [T]."""
    ran = trace.actions[:, config.prelude:config.iteration_end(config.iterations)] == PROCESS
    return ran.sum(-1) // config.block


def answer_iterations(trace, config) -> int:
    """Iterations the last token of a scored prompt ran."""
    return int(token_iterations(trace, config)[-1])


def run_controller(llm, config, prompts, controller, progress: bool = False):
    """(predicted answer [n], answer iterations [n], iterations summed over the prompt's tokens
    [n]) of every prompt."""
    logits, traces = score_windows(llm, prompts, controller=controller, progress=progress,
                                   desc="scoring")
    predicted = torch.stack([lg[-1].argmax() for lg in logits])
    per_token = [token_iterations(tr, config) for tr in traces]
    answer = torch.stack([t[-1] for t in per_token])
    example = torch.stack([t.sum() for t in per_token])
    return predicted, answer, example


def pearson(x, y):
    """Pearson correlation, or None where it is undefined (a constant series)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = (x.norm() * y.norm()).item()
    return float((x * y).sum() / denom) if denom > 0 else None


def interpolate(points, x: float) -> float:
    """Piecewise-linear value at x of [(x_i, y_i)] sorted by x (clamped at the ends)."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def evaluate_recurrent(llm, model_dir, task: ModularTask, ops_range, train_max_ops: int,
                       examples: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """{"records": [{controller, num_ops, in_range, accuracy, mean_iterations,
    mean_token_iterations, examples}], "summary": {controller: {...}}, "fixed_depth_in_range":
    [(k, accuracy)]}; see the module docstring."""
    config = recurrent_model.load_config(model_dir)
    ops_range = [int(n) for n in ops_range]
    if not ops_range or min(ops_range) < 1:
        raise ValueError(f"numbers of operators must be integers >= 1, got {ops_range}")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples must be an integer >= 1, got {examples!r}")
    controllers = {f"halting-{kind}": load_controller(model_dir, kind) for kind in KINDS}
    controllers.update({f"fixed-{k}": fixed_depth_actions(config, k)
                        for k in range(1, config.iterations + 1)})
    g = torch.Generator().manual_seed(seed)
    data = {n: [task.sample(n, g) for _ in range(examples)] for n in ops_range}
    records, per_example = [], {name: [] for name in controllers}
    from tqdm import tqdm
    jobs = [(name, n) for name in controllers for n in ops_range]
    for name, n in tqdm(jobs, desc="eval-recurrent", unit="run", disable=not progress):
        prompts = [p for p, _ in data[n]]
        answers = torch.tensor([targets[-1] for _, targets in data[n]])
        predicted, iterations, token_its = run_controller(llm, config, prompts, controllers[name])
        tokens = torch.tensor([len(p) for p in prompts])
        correct = predicted == answers
        records.append({"controller": name, "num_ops": n, "in_range": n <= train_max_ops,
                        "accuracy": float(correct.float().mean()),
                        "mean_iterations": float(iterations.float().mean()),
                        "mean_token_iterations": float(token_its.sum() / tokens.sum()),
                        "examples": examples})
        per_example[name] += [Outcome(n, int(i), int(t), int(ti), bool(c))
                              for i, t, ti, c in zip(iterations, tokens, token_its, correct)]
    fixed = []
    for k in range(1, config.iterations + 1):
        rows = [r for r in per_example[f"fixed-{k}"] if r.num_ops <= train_max_ops]
        if rows:
            fixed.append((float(k), sum(r.correct for r in rows) / len(rows)))
    summary = {}
    for kind in KINDS:
        rows = [r for r in per_example[f"halting-{kind}"] if r.num_ops <= train_max_ops]
        if not rows:
            continue
        mean_it = sum(r.answer_iterations for r in rows) / len(rows)
        mean_token_it = sum(r.token_iterations for r in rows) / sum(r.tokens for r in rows)
        summary[f"halting-{kind}"] = {
            "correlation_iterations_vs_ops": pearson([r.num_ops for r in rows],
                                                     [r.answer_iterations for r in rows]),
            "accuracy_in_range": sum(r.correct for r in rows) / len(rows),
            "mean_iterations_in_range": mean_it,
            "fixed_depth_accuracy_at_same_iterations": interpolate(fixed, mean_it),
            "mean_token_iterations_in_range": mean_token_it,
            "fixed_depth_accuracy_at_same_token_iterations": interpolate(fixed, mean_token_it),
        }
    return {"records": records, "summary": summary, "fixed_depth_in_range": fixed,
            "train_max_ops": train_max_ops,
            "iterations": config.iterations, "examples_per_ops": examples}


def format_table(result) -> str:
    names = list(dict.fromkeys(r["controller"] for r in result["records"]))
    ops = sorted({r["num_ops"] for r in result["records"]})
    cell = {(r["controller"], r["num_ops"]): r for r in result["records"]}
    head = f"{'controller':<16}" + "".join(f"{'L=' + str(n):>12}" for n in ops)
    lines = ["accuracy / mean iterations of the answer token (* = beyond the training range)",
             head, "-" * len(head)]
    for name in names:
        lines.append(f"{name:<16}" + "".join(
            f"{cell[name, n]['accuracy']:>6.2f}/{cell[name, n]['mean_iterations']:<4.1f}"
            f"{'*' if not cell[name, n]['in_range'] else ' '}" for n in ops))
    lines += ["", "mean iterations per token of the example (fixed-k: k)", head, "-" * len(head)]
    for name in (n for n in names if not n.startswith("fixed-")):
        lines.append(f"{name:<16}" + "".join(
            f"{cell[name, n]['mean_token_iterations']:>11.2f}"
            f"{'*' if not cell[name, n]['in_range'] else ' '}" for n in ops))
    lines.append("")
    for name, s in result["summary"].items():
        corr = s["correlation_iterations_vs_ops"]
        corr = "undefined (constant iterations)" if corr is None else f"{corr:.3f}"
        lines.append(f"{name}: corr(answer iterations, L) = {corr} in range; "
                     f"accuracy {s['accuracy_in_range']:.3f} against fixed depth's "
                     f"{s['fixed_depth_accuracy_at_same_iterations']:.3f} at the same answer "
                     f"iterations ({s['mean_iterations_in_range']:.2f}) and "
                     f"{s['fixed_depth_accuracy_at_same_token_iterations']:.3f} at the same "
                     f"iterations per token ({s['mean_token_iterations_in_range']:.2f})")
    return "\n".join(lines)


def run_eval_recurrent(model_dir, *, max_ops: int = 10, examples: int = 64, backend: str = "auto",
                       json_path=None, plot_path=None, seed: int = 0, progress: bool = True,
                       out=None, threads=None) -> dict:
    """The whole `anee-fast eval-recurrent` on a directory written by train-recurrent."""
    from ..llm import LLM
    out = out or sys.stdout
    log_path = os.path.join(os.fspath(model_dir), "training_log.json")
    if not os.path.isfile(log_path):
        raise FileNotFoundError(f"{log_path} not found: give a directory written by "
                                "anee-fast train-recurrent")
    with open(log_path) as f:
        trained = json.load(f)["config"]
    task = ModularTask(trained["modulus"])
    model = recurrent_model.load(model_dir)
    c = model.config
    started = time.perf_counter()
    llm = LLM(model, backend=backend, min_layers=c.prelude, always_last=c.coda, threads=threads)
    result = evaluate_recurrent(llm, model_dir, task, range(1, max_ops + 1), trained["train_max_ops"],
                                examples, seed, progress)
    summary = f"{examples} examples per L, {time.perf_counter() - started:.0f} s"
    from .plots import plot_recurrent
    report(result, f"{format_table(result)}\n{summary}", json_path=json_path, plot_path=plot_path,
           plot=plot_recurrent, out=out)
    return result
