"""The best static skip set per budget, by greedy ablation on training windows.

Starting from the full model, each step SKIPs the one more layer whose removal raises the mean
KL to the full model the least, and records the set. The search stops once the set's compute is
at or under the smallest budget asked. For each budget the answer is the recorded set of least
KL whose compute fits. Layers under min_layers (and the forced last ones) are never skipped.

To stay affordable each step after the first scores only the `width` layers whose marginal KL
was smallest when last measured (the first step measures them all); width=None measures every
remaining layer at every step. All candidates of a step go through one ragged batch. Results
are cached as JSON in the user cache dir, keyed by model, windows and settings.
"""
import hashlib
import json
import os

import torch

from ..actions import PROCESS, SKIP
from ..model.default_model import cache_root
from ..ops.weight_formats import format_of, storage
from .quality import full_logits, score_windows, token_kl

CACHE_VERSION = 1


def skip_set_compute(skip_set, num_layers: int, skip_cost: float) -> float:
    """Compute of a static skip set, as a fraction of a full forward."""
    return (num_layers - len(skip_set) * (1.0 - skip_cost)) / num_layers


def skip_set_actions(skip_set, num_layers: int) -> list:
    """The per-layer action list of a skip set (for StaticController)."""
    bad = [layer for layer in skip_set if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"skip set layers {bad} are outside 0..{num_layers - 1}")
    return [SKIP if layer in set(skip_set) else PROCESS for layer in range(num_layers)]


def windows_key(llm, windows, settings: dict) -> str:
    """A cache key from the model, its forced layers, its skip adapters, the exact windows and
    the search settings."""
    depth = llm.depth
    digest = hashlib.sha256()
    for adapter in llm.weights.adapters or ():
        for t in adapter.tensors():       # as stored: quantized adapters hash their blocks
            digest.update(format_of(t).encode())
            digest.update(storage(t).detach().float().cpu().numpy().tobytes())
    digest.update(json.dumps({"model": str(llm.name), "layers": llm.num_layers,
                              "weights": llm.weights.weight_format,
                              "skip_cost": round(depth.skip_cost, 6), "min_layers": depth.min_layers,
                              "always_last": depth.always_last, "version": CACHE_VERSION,
                              **settings}, sort_keys=True).encode())
    for window in windows:
        digest.update(torch.as_tensor(window, dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:24]


def cache_path(kind: str, key: str) -> str:
    return os.path.join(cache_root(), "eval", f"{kind}-{key}.json")


def load_cached(kind: str, key: str):
    """The cached JSON object, or None when there is none (a corrupt file is an error)."""
    path = cache_path(kind, key)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt evaluation cache {path} ({e}): delete it to recompute") from None


def save_cached(kind: str, key: str, value) -> str:
    path = cache_path(kind, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)
    return path


def mean_kls(llm, windows, full, skip_sets, desc, progress):
    """Mean per-token KL to the full model of each skip set, all sets in one ragged batch."""
    L = llm.num_layers
    batch, actions = [], []
    for skip_set in skip_sets:
        row = torch.tensor(skip_set_actions(skip_set, L), dtype=torch.int8)
        for window in windows:
            batch.append(window)
            actions.append(row.expand(len(window), L).contiguous())
    logits, _ = score_windows(llm, batch, actions, desc=desc, progress=progress)
    kls = []
    for i in range(len(skip_sets)):
        chunk = logits[i * len(windows):(i + 1) * len(windows)]
        kls.append(float(torch.cat([token_kl(f, q) for f, q in zip(full, chunk)]).mean()))
    return kls


def greedy_path(llm, windows, stop_compute: float, width=8, progress: bool = True,
                use_cache: bool = True) -> list:
    """The greedy ablation path: [{skip: [...], kl, compute}], from the empty set down to a set
    whose compute is <= stop_compute (or every skippable layer skipped)."""
    if not windows:
        raise ValueError("the static-set search needs at least one training window")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be None or an integer >= 1, got {width!r}")
    skip_cost, L = llm.depth.skip_cost, llm.num_layers
    key = windows_key(llm, windows, {"width": width})
    cached = load_cached("static", key) if use_cache else None
    if cached is not None and (cached[-1]["compute"] <= stop_compute + 1e-9
                               or len(cached[-1]["skip"]) == len(llm.depth.decidable_layers)):
        return cached
    full = full_logits(llm, windows, progress=progress)
    path = [{"skip": [], "kl": 0.0, "compute": 1.0}]
    remaining = llm.depth.decidable_layers
    last_kl = {layer: 0.0 for layer in remaining}
    total = sum(1 for n in range(len(remaining) + 1)
                if skip_set_compute(range(n), L, skip_cost) > stop_compute + 1e-9)
    from tqdm import tqdm
    with tqdm(total=total, desc="static-set search", unit="step", disable=not progress) as bar:
        while remaining and path[-1]["compute"] > stop_compute + 1e-9:
            first_step = len(path) == 1
            ranked = sorted(remaining, key=lambda layer: (last_kl[layer], layer))
            candidates = ranked if width is None or first_step else ranked[:width]
            current = path[-1]["skip"]
            kls = mean_kls(llm, windows, full, [sorted(current + [c]) for c in candidates],
                            f"step {len(path)}", progress)
            for layer, kl in zip(candidates, kls):
                last_kl[layer] = kl
            best = min(range(len(candidates)), key=lambda i: (kls[i], candidates[i]))
            chosen = sorted(current + [candidates[best]])
            remaining.remove(candidates[best])
            path.append({"skip": chosen, "kl": kls[best],
                         "compute": skip_set_compute(chosen, L, skip_cost)})
            bar.update(1)
    if use_cache:
        save_cached("static", key, path)
    return path


def best_static_sets(llm, windows, budgets, width=8, progress: bool = True, use_cache: bool = True) -> dict:
    """{budget: {skip, kl, compute}}: per budget the searched set of least KL that fits it."""
    budgets = [float(b) for b in budgets]
    if not budgets or any(not 0.0 <= b <= 1.0 for b in budgets):
        raise ValueError(f"budgets must be a non-empty list of numbers in [0, 1], got {budgets}")
    stop = min(llm.depth.effective_budget(b) for b in budgets)
    path = greedy_path(llm, windows, stop, width=width, progress=progress, use_cache=use_cache)
    chosen = {}
    for budget in budgets:
        fitting = [step for step in path if step["compute"] <= llm.depth.effective_budget(budget) + 1e-9]
        chosen[budget] = min(fitting, key=lambda step: (step["kl"], len(step["skip"])))
    return chosen
