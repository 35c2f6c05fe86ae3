"""The built-in controllers that need no file: budget, saturation heuristic, static skip set."""
import torch

from ..actions import EXIT, PROCESS, SKIP
from .base import Controller


def _codes(mask_exit, ctx, otherwise=PROCESS):
    return torch.where(mask_exit, EXIT, otherwise).to(torch.int8)


class BudgetController(Controller):
    """ANEE v0.0.1: run every layer until the budget runs out (or falls under a threshold)."""
    name = "budget"
    graph_safe = True
    reads_h_prev = False

    def __init__(self, exit_threshold: float = 0.0):
        self.exit_threshold = exit_threshold

    def propose(self, ctx):
        if self.exit_threshold <= 0:
            # budget_left < 0 cannot hold where a PROCESS is still affordable (it would leave
            # budget for every later layer), so the budget rule alone decides: no op to launch.
            return ctx.all_process()
        return _codes(ctx.budget_left < self.exit_threshold, ctx)


class HeuristicController(Controller):
    """Saturation heuristic: SKIP a layer when the previous one barely turned the residual
    (cosine(h, h one layer earlier) >= skip_saturation), EXIT when it turned it even less
    (>= exit_saturation) or, if `confidence` is set, when the next-token distribution read at
    this depth is that sure (max probability; costs an LM-head product per layer, see features.lm_head_confidence).
    A layer right after a SKIP always runs: the skipped layer gave no new signal.
    """
    name = "heuristic"
    graph_safe = True

    def __init__(self, skip_saturation: float = 0.98, exit_saturation: float = 0.995,
                 confidence=None, exit_threshold: float = 0.0):
        self.skip_saturation = skip_saturation
        self.exit_saturation = exit_saturation
        self.confidence = confidence
        self.exit_threshold = exit_threshold

    def propose(self, ctx):
        # One op (the backend's saturation_codes); h equals h_prev at layer 0 too.
        codes = ctx.ops.saturation_codes(ctx.h, ctx.h_prev, ctx.budget_left, self.skip_saturation,
                                         self.exit_saturation, self.exit_threshold)
        if self.confidence is not None:
            codes = torch.where(ctx.readout()[1] >= self.confidence, EXIT, codes).to(torch.int8)
        return codes


class StaticController(Controller):
    """The same per-layer action list for every token (e.g. a fixed skip set)."""
    name = "static"
    graph_safe = True
    reads_h_prev = False

    def __init__(self, layer_actions):
        codes = [int(a) for a in layer_actions]
        if any(a not in (PROCESS, SKIP, EXIT) for a in codes):
            raise ValueError(f"static controller actions must be 0/1/2, got {codes}")
        self.layer_actions = codes

    def check_model(self, num_layers, hidden_size):
        if len(self.layer_actions) != num_layers:
            raise ValueError(f"static controller has {len(self.layer_actions)} actions for a "
                             f"{num_layers}-layer model")

    def propose(self, ctx):
        self.check_model(ctx.num_layers, ctx.h.shape[-1])
        return torch.full((ctx.h.shape[0],), self.layer_actions[ctx.layer], dtype=torch.int8,
                          device=ctx.h.device)
