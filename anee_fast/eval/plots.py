"""Pictures of a Trace (which layers each token ran, what each token spent, how deep the model
was), of evaluation results (quality against compute, halting against difficulty) and of training
runs (their curves).

Figures are drawn with matplotlib's object API on an Agg canvas, never through pyplot, so
importing this module neither needs a display nor changes the backend of the caller's process.
Every function writes a PNG (creating parent folders) and returns the path it wrote.
"""
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..actions import ACTION_NAMES, EXIT, PROCESS, SKIP

# One colour per action code, in code order (PROCESS=0, SKIP=1, EXIT=2); colour-blind safe.
ACTION_COLORS = ("#2b6cb0", "#f2a541", "#d9d9d9")
PROMPT_COLOR, GENERATED_COLOR, OVER_COLOR = "#8fb3d9", "#2b6cb0", "#c0392b"
MAX_TOKEN_LABELS = 64      # more tokens than this: numeric ticks instead of token strings
DPI = 120


def _arrays(trace):
    """(actions int [T, L], compute float [T]) as numpy; a trace with no tokens is an error."""
    actions = _numpy(trace.actions).astype(np.int64)
    compute = _numpy(trace.compute).astype(np.float64)
    if actions.ndim != 2 or actions.shape[0] == 0 or actions.shape[1] == 0:
        raise ValueError(f"cannot plot a trace with actions of shape {list(actions.shape)}: "
                         "it needs at least one token and one layer")
    return actions, compute


def _numpy(x):
    if hasattr(x, "detach"):      # a torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _save(fig, path):
    """Writes the figure as PNG, making parent folders; returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _label(token: str, width: int = 12) -> str:
    """A token string made safe for a tick label: visible newlines/tabs, no mathtext, short."""
    text = str(token).replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    if not text.strip():
        text = repr(str(token))
    return text if len(text) <= width else text[:width - 1] + "…"


def _mark_boundary(ax, trace, num_tokens):
    """Dashed line between the prompt and the generated tokens (when both are present)."""
    n = int(getattr(trace, "num_prompt_tokens", 0) or 0)
    if 0 < n < num_tokens:
        ax.axvline(n - 0.5, color="black", linestyle="--", linewidth=1.2,
                   label=f"prompt | generated (token {n})")
        return True
    return False


def plot_heatmap(trace, path, tokens=None, title=None, max_token_labels: int = MAX_TOKEN_LABELS):
    """Execution heatmap, token x layer: shows where the controller spent and saved depth.

    tokens: optional strings, one per traced token, used as x tick labels when there are at most
    `max_token_labels` of them.
    """
    actions, _ = _arrays(trace)
    T, L = actions.shape
    if tokens is not None and len(tokens) != T:
        raise ValueError(f"tokens has {len(tokens)} strings but the trace has {T} tokens")
    labelled = tokens is not None and T <= max_token_labels
    width = min(max(7.5, 0.22 * T + 3.0), 30.0)
    height = min(max(3.2, 0.18 * L + 2.0), 12.0) + (0.8 if labelled else 0.0)
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot(1, 1, 1)
    cmap = ListedColormap(ACTION_COLORS)
    norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5], cmap.N)
    ax.imshow(actions.T, aspect="auto", origin="lower", interpolation="nearest", cmap=cmap, norm=norm,
              extent=(-0.5, T - 0.5, -0.5, L - 0.5))
    _mark_boundary(ax, trace, T)
    if labelled:
        ax.set_xticks(range(T))
        ax.set_xticklabels([_label(t) for t in tokens], rotation=90, fontsize=7)
    ax.set_xlabel("token position" + (" (token text below)" if labelled else ""))
    ax.set_ylabel("layer")
    if L <= 40:
        ax.set_yticks(range(0, L, 1 if L <= 16 else 2))
    counts = [(actions == code).sum() for code in (PROCESS, SKIP, EXIT)]
    handles = [Patch(facecolor=c, edgecolor="black", linewidth=0.5,
                     label=f"{name} ({n / actions.size:.0%})")
               for c, name, n in zip(ACTION_COLORS, ACTION_NAMES, counts)]
    handles += [h for h in ax.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False)
    ax.set_title(title or f"Execution per token and layer\n{T} tokens, {L} layers, "
                          f"energy budget {trace.budget:.0%}", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_compute(trace, path, title=None, floor=None):
    """Compute spent by each token as a fraction of a full forward, against the energy budget.

    Bars above the budget line are tokens held up by the min_layers floor; pass `floor` (that
    cost, as a fraction) to draw it too.
    """
    _, compute = _arrays(trace)
    T = compute.shape[0]
    n_prompt = int(getattr(trace, "num_prompt_tokens", 0) or 0)
    colors = np.where(np.arange(T) < n_prompt, PROMPT_COLOR, GENERATED_COLOR).astype(object)
    colors[compute > trace.budget + 1e-6] = OVER_COLOR
    fig = Figure(figsize=(min(max(8.0, 0.12 * T + 4.0), 30.0), 4.4))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(T), compute, width=0.85 if T > 1 else 0.5, color=list(colors), linewidth=0)
    ax.axhline(trace.budget, color="black", linewidth=1.5, label=f"energy budget {trace.budget:.0%}")
    if floor is not None:
        ax.axhline(floor, color=OVER_COLOR, linestyle=":", linewidth=1.2,
                   label=f"min_layers floor {floor:.1%}")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1.0, label="full forward (100%)")
    _mark_boundary(ax, trace, T)
    handles, _ = ax.get_legend_handles_labels()
    handles = [Patch(color=PROMPT_COLOR, label="prompt token"),
               Patch(color=GENERATED_COLOR, label="generated token"),
               Patch(color=OVER_COLOR, label="above budget (min_layers floor)")] + handles
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False)
    ax.set_xlim(-0.6, T - 0.4)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("token position")
    ax.set_ylabel("compute spent (fraction of a full forward)")
    ax.set_title(title or f"Compute spent per token\nmean {compute.mean():.1%} of a full forward, "
                          f"saved {1 - compute.mean():.1%} (budget {trace.budget:.0%})", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_depth_profile(trace, path, title=None, generated_only: bool = False):
    """Fraction of tokens that PROCESS / SKIP / EXIT at each layer: the model's effective depth.

    generated_only: profile only the generated tokens (the prompt's are left out).
    """
    actions, _ = _arrays(trace)
    if generated_only:
        actions = actions[int(getattr(trace, "num_prompt_tokens", 0) or 0):]
        if actions.shape[0] == 0:
            raise ValueError("the trace has no generated tokens to profile")
    T, L = actions.shape
    fractions = np.stack([(actions == code).mean(axis=0) for code in (PROCESS, SKIP, EXIT)])
    fig = Figure(figsize=(min(max(7.0, 0.3 * L + 3.0), 20.0), 4.4))
    ax = fig.add_subplot(1, 1, 1)
    layers = np.arange(L)
    bottom = np.zeros(L)
    for frac, color, name in zip(fractions, ACTION_COLORS, ACTION_NAMES):
        ax.bar(layers, frac, bottom=bottom, color=color, edgecolor="white", linewidth=0.4,
               label=name)
        bottom += frac
    ax.set_xlim(-0.6, L - 0.4)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of tokens")
    if L <= 40:
        ax.set_xticks(range(0, L, 1 if L <= 16 else 2))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    depth = (actions == PROCESS).sum(axis=1).mean()
    which = "generated tokens" if generated_only else "tokens"
    ax.set_title(title or f"Depth profile over {T} {which}\n{depth:.1f} of {L} layers "
                          f"processed on average", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_quality_vs_compute(records, path, title=None):
    """Quality against realised compute, one curve per controller: mean KL to the full model
    (log scale), top-1 agreement, and how the greedy continuations read: the full model's
    perplexity of them (log scale) and their distinct 2-grams, with the full model's own values
    dashed. `records` are evaluation records (eval/evaluation.py)."""
    panels = (("kl", "mean KL(full || controller), nats"),
              ("top1", "top-1 agreement with the full model"),
              ("gen_ppl", "gen_ppl: full model's perplexity\nof the greedy continuation"),
              ("distinct2", "distinct2: distinct 2-grams\nof the greedy continuation"))
    curves = {}
    for r in records:
        curves.setdefault(r["controller"], []).append(r)
    if not curves:
        raise ValueError("no evaluation records to plot")
    fig = Figure(figsize=(11.0, 8.0))
    axes = [fig.add_subplot(2, 2, i + 1) for i in range(len(panels))]
    for name, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["compute"])
        compute = [r["compute"] for r in rows]
        marker = "*" if name == "full" else "o"
        for ax, (key, _) in zip(axes, panels):
            ax.plot(compute, [r[key] for r in rows], marker=marker, label=name)
    for ax, key in zip(axes[2:], ("gen_ppl", "distinct2")):
        for r in curves.get("full", []):
            ax.axhline(r[key], color="grey", linestyle="--", linewidth=1.0, label="full model")
            ax.legend(handles=ax.get_lines()[-1:], loc="best", fontsize=8, frameon=False)
    axes[0].set_yscale("symlog", linthresh=1e-2)     # the full model's KL is exactly 0
    axes[1].set_ylim(0, 1.02)
    axes[2].set_yscale("log")
    axes[3].set_ylim(0, 1.02)
    for ax, (_, label) in zip(axes, panels):
        ax.set_ylabel(label)
        ax.set_xlabel("realised compute (fraction of a full forward)")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title or "Quality against compute on held-out text", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_recurrent(result, path):
    """Answer accuracy, mean answer iterations and mean iterations per token of the example
    against the number of operators L, one line per controller (halting, and fixed depth at 1, R/2
    and R iterations; the training range shaded), then in-range accuracy against both measures
    of compute, next to fixed depth's. `result` is what evaluate_recurrent (eval/recurrent_eval.py)
    returns."""
    R, records = result["iterations"], result["records"]
    shown = ["halting-early", "halting-online"] + [f"fixed-{k}" for k in sorted({1, max(1, R // 2), R})]
    fig = Figure(figsize=(11.0, 8.0))
    panels = [("accuracy", "answer accuracy"),
              ("mean_iterations", "iterations run by the answer token"),
              ("mean_token_iterations", "iterations per token of the example")]
    axes = [fig.add_subplot(2, 2, i + 1) for i in range(len(panels))]
    for name in shown:
        rows = sorted((r for r in records if r["controller"] == name), key=lambda r: r["num_ops"])
        if not rows:
            continue
        style = dict(marker="o") if name.startswith("halting") else dict(linestyle="--")
        ops = [r["num_ops"] for r in rows]
        for ax, (key, _) in zip(axes, panels):
            ax.plot(ops, [r[key] for r in rows], label=name, **style)
    for ax, (_, label) in zip(axes, panels):
        ax.axvspan(0.5, result["train_max_ops"] + 0.5, color="0.92", zorder=0)
        ax.set_xlabel("operators L (shaded: training range)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(loc="lower left", fontsize=8)
    ax = fig.add_subplot(2, 2, 4)
    fixed = result["fixed_depth_in_range"]
    ax.plot([k for k, _ in fixed], [a for _, a in fixed], "k--", label="fixed depth")
    for (name, s), color in zip(result["summary"].items(), ("C0", "C1")):
        ax.plot(s["mean_token_iterations_in_range"], s["accuracy_in_range"], "o", color=color,
                label=f"{name}, per token")
        ax.plot(s["mean_iterations_in_range"], s["accuracy_in_range"], "o", color=color,
                fillstyle="none", label=f"{name}, answer only")
    ax.set_xlabel("mean iterations: per token of the example, or of the answer only")
    ax.set_ylabel("in-range answer accuracy (L <= %d)" % result["train_max_ops"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Halting against difficulty on chained modular arithmetic", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_controller_training(log: dict, path):
    """Distillation per step: the batch's KL to the full model (colour: its mean budget) and its
    realised compute against that budget. `log` is what train_controller
    (training/controller_training.py) returns."""
    fig = Figure(figsize=(10.0, 3.5))
    ax_kl, ax_compute = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    steps = log.get("distillation") or []
    x = [e["step"] for e in steps]
    budgets = [e["budget"] for e in steps]
    ax_kl.scatter(x, [e["kl"] for e in steps], c=budgets, cmap="viridis", s=14)
    ax_kl.set(title="distillation: KL(full || run), colour = budget", xlabel="step", ylabel="nats")
    ax_compute.plot(x, budgets, color="gray", lw=0.8, label="budget (batch mean)")
    ax_compute.plot(x, [e["compute"] for e in steps], lw=1.0, label="realised compute")
    ax_compute.set(title="compute per token", xlabel="step")
    ax_compute.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_recurrent_training(log: dict, path):
    """Model loss and accuracy per step (then on-policy fine-tuning's), and the answer's mean
    cross-entropy per exit. `log` is what train_recurrent (training/recurrent_training.py)
    returns."""
    fig = Figure(figsize=(10.0, 3.5))
    ax_model, ax_exit = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    model_steps = log["config"]["steps"]
    for key, offset, stage in (("model_log", 0, ""), ("policy_log", model_steps, " (on-policy)")):
        entries = log.get(key, [])
        steps = [offset + e["step"] for e in entries]
        ax_model.plot(steps, [e["loss"] for e in entries], label="loss" + stage)
        ax_model.plot(steps, [e["accuracy"] for e in entries], label="accuracy" + stage)
    ax_model.set(title="recurrent model, then on-policy fine-tuning", xlabel="step")
    ax_model.legend(fontsize=8)
    ce = log["exit_ce_by_iteration"]
    ax_exit.plot(range(1, len(ce) + 1), ce, marker="o")
    ax_exit.set(title="answer cross-entropy by exit", xlabel="iterations", ylabel="nats")
    fig.tight_layout()
    return _save(fig, path)
