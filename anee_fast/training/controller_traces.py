"""Training traces for the budget-conditioned controller: per token and layer, the controller's
input state and two teachers' labels.

Oracle teacher: a token's sensitivity to layer l is the KL(full || run) of its final distribution
when layer l alone is SKIPped (for every token of the window; one forward per decidable layer). At
budget b the oracle PROCESSes each token's most sensitive layers that the budget pays for and
SKIPs the rest. Heuristic teacher: what HeuristicController proposes in the same state.

The states are recorded on the oracle's own path: the oracle actions are replayed through the
engine at each sampled budget, so h, h_prev and budget_left are what the controller would see
when it acts like the teacher.
"""
import math

import torch

from ..actions import PROCESS, SKIP
from ..control.base import Controller
from ..control.controllers import HeuristicController
from ..control.depth_policy import DepthAccounting
from ..control.trained import controller_features
from ..eval.quality import full_logits, score_windows, token_kl

_EPS = 1e-6


def decidable_layers(num_layers: int, min_layers: int, always_last: int) -> list:
    """Layers a controller decides (the others are forced PROCESS by the depth policy)."""
    return list(range(min_layers, num_layers - always_last))


def layer_sensitivity(llm, windows, full=None, progress: bool = True,
                      max_batch_tokens: int = 2048) -> list:
    """Per window a float32 [T, L]: each token's KL to the full model when that layer alone is
    SKIPped (0 for forced layers). One forward of every window per decidable layer."""
    depth, L = llm.depth, llm.num_layers
    if full is None:
        full = full_logits(llm, windows, progress=progress)
    sens = [torch.zeros((len(w), L)) for w in windows]
    layers = depth.decidable_layers
    # (layer, window) variants go through in batches of about max_batch_tokens (large batches
    # run much faster on the CPU); each batch's logits are reduced to KLs at once.
    variants = [(layer, i) for layer in layers for i in range(len(windows))]
    batches, current, tokens = [], [], 0
    for layer, i in variants:
        if current and tokens + len(windows[i]) > max_batch_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append((layer, i))
        tokens += len(windows[i])
    batches.append(current)
    from tqdm import tqdm
    for batch in tqdm(batches, desc="oracle: layer sensitivity", unit="batch", disable=not progress):
        actions = []
        for layer, i in batch:
            a = torch.full((len(windows[i]), L), PROCESS, dtype=torch.int8)
            a[:, layer] = SKIP
            actions.append(a)
        logits, _ = score_windows(llm, [windows[i] for _, i in batch], actions, progress=False,
                                  max_batch_tokens=max_batch_tokens)
        for (layer, i), q in zip(batch, logits):
            sens[i][:, layer] = token_kl(full[i], q)
    return sens


def processable_layers(budget: float, num_layers: int, skip_cost: float, min_layers: int,
                       always_last: int) -> int:
    """How many decidable layers a token at `budget` can PROCESS (the rest paid as SKIP)."""
    floor = DepthAccounting(num_layers, skip_cost, min_layers, always_last).floor
    limit = max(budget, floor) * num_layers
    forced = min(min_layers, num_layers) + min(always_last, num_layers - min(min_layers, num_layers))
    free = len(decidable_layers(num_layers, min_layers, always_last))
    k = math.floor((limit - forced - free * skip_cost) / (1.0 - skip_cost) + _EPS)
    return max(0, min(free, k))


def oracle_actions(sensitivity, budget: float, skip_cost: float, min_layers: int,
                   always_last: int = 0, order=None, max_swaps: int = 1,
                   margin: float = 2.0) -> torch.Tensor:
    """int8 [T, L] oracle actions at `budget`; forced layers PROCESS.

    Without `order`: per token its most sensitive decidable layers that fit the budget PROCESS,
    the rest SKIP. With `order` (decidable layers, the first to skip first, e.g. a greedy
    ablation path): the static set that skips order's first layers is the base, and per token
    up to `max_swaps` times its most sensitive skipped layer trades places with its least
    sensitive processed one, when that is `margin` times more sensitive. Single-layer
    sensitivities ignore how skipped layers interact, which the base set accounts for.
    """
    T, L = sensitivity.shape
    layers = decidable_layers(L, min_layers, always_last)
    k = processable_layers(budget, L, skip_cost, min_layers, always_last)
    actions = torch.full((T, L), PROCESS, dtype=torch.int8)
    if order is None:
        actions[:, layers] = SKIP
        if k:
            top = sensitivity[:, layers].topk(k, dim=1).indices
            actions.scatter_(1, torch.tensor(layers)[top], PROCESS)
        return actions
    order = [int(layer) for layer in order]
    if sorted(order) != layers:
        raise ValueError(f"order must list every decidable layer {layers} once, got {order}")
    skipped, processed = order[:len(layers) - k], order[len(layers) - k:]
    actions[:, skipped] = SKIP
    m = min(max_swaps, len(skipped), len(processed))
    if m:
        s_skip, i_skip = sensitivity[:, skipped].sort(dim=1, descending=True)
        s_proc, i_proc = sensitivity[:, processed].sort(dim=1)
        swap = s_skip[:, :m] > margin * s_proc[:, :m]        # once false, false for the rest
        rows = torch.arange(T)[:, None].expand(T, m)[swap]
        actions[rows, torch.tensor(skipped)[i_skip[:, :m]][swap]] = PROCESS
        actions[rows, torch.tensor(processed)[i_proc[:, :m]][swap]] = SKIP
    return actions


class _TeacherReplay(Controller):
    """Proposes the given actions (rows = the step's tokens in order) and records the state and
    the heuristic teacher's proposal at each decided layer."""

    def __init__(self, actions):
        self.actions = actions
        self.heuristic = HeuristicController()
        self.rows = []

    def propose(self, ctx):
        scalars, normed = controller_features(ctx)
        heuristic = self.heuristic.propose(ctx) == PROCESS
        oracle = self.actions[:, ctx.layer]
        self.rows.append((ctx.layer, scalars.clone(), normed.half(), oracle == PROCESS, heuristic))
        return oracle


def skip_order(llm, windows, sensitivity, stop_budget: float = 0.25, width: int = 4,
               progress: bool = True) -> list:
    """Decidable layers in the order to skip them: the greedy ablation path
    (eval/static_search.py) on `windows` down to `stop_budget`, then the rest by increasing mean
    single-layer sensitivity."""
    from ..eval.static_search import greedy_path
    path = greedy_path(llm, windows, llm.depth.effective_budget(stop_budget), width=width,
                       progress=progress, use_cache=False)
    order = []
    for step in path[1:]:
        order += [layer for layer in step["skip"] if layer not in order]
    depth = llm.depth
    mean = torch.cat(sensitivity).mean(0)
    rest = [layer for layer in depth.decidable_layers
            if layer not in order]
    return order + sorted(rest, key=lambda layer: (float(mean[layer]), layer))


def collect_traces(llm, windows, budgets, order_windows: int = 4, order_stop_budget: float = 0.2,
                   max_swaps: int = 1, margin: float = 2.0, progress: bool = True,
                   max_batch_tokens: int = 2048) -> dict:
    """The training set: one row per (window token, budget, decided layer).

    The oracle's base order comes from a greedy ablation on the first `order_windows` windows.
    Returns {layer [M] long, scalars [M, F], normed [M, hidden] float16, oracle [M] bool,
    heuristic [M] bool, budget [M]} plus the sensitivities, the order and the budgets.
    """
    if not windows:
        raise ValueError("trace collection needs at least one training window")
    depth = llm.depth
    sens = layer_sensitivity(llm, windows, progress=progress, max_batch_tokens=max_batch_tokens)
    order = skip_order(llm, windows[:order_windows], sens, order_stop_budget, progress=progress)
    groups, current, tokens = [], [], 0
    for i, w in enumerate(windows):
        if current and tokens + len(w) > max_batch_tokens:
            groups.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += len(w)
    groups.append(current)
    parts = {"layer": [], "scalars": [], "normed": [], "oracle": [], "heuristic": [], "budget": []}
    from tqdm import tqdm
    with tqdm(total=len(budgets) * len(groups), desc="oracle: replaying teachers", unit="batch",
              disable=not progress) as bar:
        for budget in budgets:
            for group in groups:
                acts = [oracle_actions(sens[i], budget, depth.skip_cost, depth.min_layers,
                                       depth.always_last, order, max_swaps, margin) for i in group]
                replay = _TeacherReplay(torch.cat(acts).to(llm.weights.device))
                llm.score([windows[i] for i in group], energy_budget=float(budget), controller=replay)
                for layer, scalars, normed, oracle, heuristic in replay.rows:
                    n = scalars.shape[0]
                    parts["layer"].append(torch.full((n,), layer, dtype=torch.long))
                    parts["scalars"].append(scalars.cpu())
                    parts["normed"].append(normed.cpu())
                    parts["oracle"].append(oracle.cpu())
                    parts["heuristic"].append(heuristic.cpu())
                    parts["budget"].append(torch.full((n,), float(budget)))
                bar.update(1)
    traces = {k: torch.cat(v) for k, v in parts.items()}
    traces["sensitivity"] = sens
    traces["order"] = order
    traces["budgets"] = [float(b) for b in budgets]
    return traces
