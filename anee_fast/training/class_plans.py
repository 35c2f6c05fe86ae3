"""Per-token-class skip plans: the base a trained controller falls back to, in place of one
static set for every token.

A token's class is the nearest of k centroids (k-means over the RMS-normalised residual entering
`layer`, on training windows); the class is taken once, at that layer, and kept for the rest of
the token's layers. At each plan budget b the base is the static set S_b that SKIPs the first
n_b layers of the trainer's order (n_b = what b leaves unpaid). Each class may then swap one
layer of S_b for one processed layer, so every token still SKIPs n_b layers (equal compute),
chosen by measurement on the training windows:

1. toggle deltas: for every decidable layer l, each token's KL change when l alone is toggled
   in S_b (removed if skipped, added if processed): one forward of the windows per layer;
2. per class, the `candidates` layers of S_b whose un-skipping helps the class most on average,
   each paired with the processed layer whose skipping hurts it least, are tried in turn with
   every other class on its current plan; a swap is kept when the mean training KL falls.

Single-layer deltas do not add up when a whole class swaps at once, which is why step 2
measures jointly (docs/quality.md, "Per-token-class plans in the shipped controller").
"""
import torch
from tqdm import tqdm

from ..actions import PROCESS, SKIP
from ..control.base import Controller
from ..control.trained import nearest, normalised
from ..eval.category_router import kmeans
from ..eval.quality import score_windows, token_kl


class _Recorder(Controller):
    """Runs every layer and keeps the residual entering `layer`."""

    def __init__(self, layer: int):
        self.layer, self.h = layer, None

    def propose(self, ctx):
        if ctx.layer == self.layer:
            self.h = ctx.h.float().clone()
        return torch.full((ctx.h.shape[0],), PROCESS, dtype=torch.int8, device=ctx.h.device)


def layer_residuals(llm, windows, layer: int) -> torch.Tensor:
    """[tokens of all windows, hidden]: RMS-normalised residuals entering `layer`, full depth."""
    out = []
    for window in windows:
        recorder = _Recorder(layer)
        score_windows(llm, [window], controller=recorder, progress=False)
        out.append(normalised(recorder.h).cpu())
    return torch.cat(out)


def fit_class_plans(llm, windows, full, order: list, skip_counts: list, classes: int = 16,
                    candidates: int = 3, layer: int = 2, seed: int = 0, progress: bool = True) -> dict:
    """Class plans for the given skip counts (n of `order`'s first layers SKIPped).

    windows: training token windows; full: their full-depth logits. Returns {"layer",
    "centroids" [classes, hidden], "plans": {n: [sorted skipped layers per class]}, "log"}.
    """
    L = llm.num_layers
    if layer not in order:
        raise ValueError(f"the class layer {layer} must be a decidable layer (in the order)")
    x = layer_residuals(llm, windows, layer)
    centroids = kmeans(x, classes, seed=seed)
    assign = nearest(x, centroids)
    lengths = [len(w) for w in windows]

    def mean_kl(skip_of_token):
        """Mean KL over the windows' tokens when token t SKIPs skip_of_token(t)'s layers."""
        actions = torch.zeros((len(assign), L), dtype=torch.int8)
        for c, skipped in skip_of_token.items():
            rows = (assign == c).nonzero().squeeze(1)
            for l in skipped:
                actions[rows, l] = SKIP
        logits, _ = score_windows(llm, windows, list(actions.split(lengths)), progress=False)
        return torch.cat([token_kl(f, q) for f, q in zip(full, logits)])

    plans, log = {}, []
    steps = len(skip_counts) * (len(order) + classes)
    bar = tqdm(total=steps, desc="class plans", unit="step", disable=not progress)
    for n in skip_counts:
        static = sorted(order[:n])
        base = mean_kl({c: static for c in range(classes)})
        delta = {}
        for l in order:                               # 1. toggle deltas, per token
            toggled = [s for s in static if s != l] if l in static else static + [l]
            delta[l] = mean_kl({c: toggled for c in range(classes)}) - base
            bar.update()
        current = {c: static for c in range(classes)}
        best = base.mean().item()
        entry = {"skip_count": n, "static_kl": best, "swaps": []}
        processed = [l for l in order if l not in static]
        for c in range(classes):                      # 2. joint choice, class by class
            members = assign == c
            if members.any() and processed and static:
                gain = {l: delta[l][members].mean().item() for l in order}
                ups = sorted(static, key=lambda l: gain[l])[:candidates]
                down = min(processed, key=lambda l: gain[l])
                for up in ups:
                    trial = {**current, c: sorted([s for s in static if s != up] + [down])}
                    kl = mean_kl(trial).mean().item()
                    if kl < best - 1e-4:
                        best, current = kl, trial
                        entry["swaps"].append({"class": c, "process": up, "skip": down, "kl": kl})
            bar.update()
        entry["train_kl"] = best
        plans[n] = [current[c] for c in range(classes)]
        log.append(entry)
    bar.close()
    return {"layer": layer, "centroids": centroids, "plans": plans, "log": log}
