"""Controllers: batched functions from a layer's context to proposed action codes [N] int8.

A controller only proposes. `DepthPolicy` applies min_layers, EXIT stickiness and the budget,
so no controller can overspend. Every decision is a device tensor: nothing here reads a value
back to the host.
"""
import os
from typing import Callable

import torch
from torch import nn

from ..ops import reference as reference_ops
from ..actions import EXIT, PROCESS, SKIP
from .features import STATE_DIM, anee_state


class LayerContext:
    """What a controller sees at one layer. `budget_left` ([N] compute still allowed, as a
    fraction of a full forward) may be given as a function: it is computed on first read, so a
    controller that never reads it costs no op; `readout` likewise (an LM-head product). `ops`:
    the backend's op set, for controllers with an op of their own."""

    def __init__(self, layer: int, num_layers: int, h: torch.Tensor, h_prev: torch.Tensor,
                 budget_left, readout: Callable = None, budget: torch.Tensor = None,
                 skip_cost: float = 0.0, all_process: torch.Tensor = None, ops=reference_ops):
        self.layer = layer
        self.num_layers = num_layers
        self.h = h                       # [N, hidden] residual entering the layer
        self.h_prev = h_prev             # [N, hidden] residual entering the previous layer
        self._budget_left = budget_left
        self.readout = readout           # () -> (entropy, max prob) of the LM head at this depth
        self.budget = budget             # [N] the token's whole budget (after the floor)
        self.skip_cost = skip_cost       # cost of a SKIP as a fraction of a PROCESS
        self._all_process = all_process
        self.ops = ops

    @property
    def budget_left(self) -> torch.Tensor:
        if callable(self._budget_left):
            self._budget_left = self._budget_left()
        return self._budget_left

    def all_process(self) -> torch.Tensor:
        """[N] int8 PROCESS codes: the depth policy passes a preset tensor, so proposing it
        launches nothing."""
        if self._all_process is None:
            self._all_process = torch.full((self.h.shape[0],), PROCESS, dtype=torch.int8,
                                           device=self.h.device)
        return self._all_process


class Controller:
    name = "controller"
    # True when propose() may be captured in a CUDA graph and replayed on new inputs: device
    # tensors only, no host reads, no state carried from one step to the next (cuda_graphs.py).
    graph_safe = False
    # False when propose() never reads ctx.h_prev: where the residual is updated in place (a
    # graph's conditional layers) the layer loop then keeps no copy of it.
    reads_h_prev = True

    def propose(self, ctx: LayerContext) -> torch.Tensor:
        raise NotImplementedError

    def check_model(self, num_layers: int, hidden_size: int) -> None:
        """Raises ValueError when this controller cannot serve a model of that shape; the engine
        asks before a request is queued, so a mismatch never fails a shared step."""


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
    this depth is that sure (max probability; costs an LM-head product per layer, see profiler).
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


class LearnedController(Controller):
    """ANEE 0.4's MLP over the six-feature state; argmax over (PROCESS, SKIP, EXIT)."""
    name = "learned"
    graph_safe = True

    def __init__(self, hidden_dim: int = 32, state_dim: int = STATE_DIM, exit_threshold: float = 0.0):
        if state_dim != STATE_DIM:
            raise ValueError(f"state_dim must be {STATE_DIM} (the ANEE 0.4 state), got {state_dim}")
        self.net = nn.Sequential(nn.Linear(state_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 3))
        self.exit_threshold = exit_threshold

    @classmethod
    def from_file(cls, path, exit_threshold: float = 0.0):
        """Loads an ANEE 0.4 controller file (`torch.save(state_dict)`, keys net.0.*, net.2.*)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"controller file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read controller file {path}: {e}") from e
        expected = {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
        if not isinstance(state, dict) or set(state) != expected:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path} is not an ANEE controller state_dict: expected keys "
                             f"{sorted(expected)}, got {keys}")
        w0, w2 = state["net.0.weight"], state["net.2.weight"]
        if w0.dim() != 2 or w2.dim() != 2 or w0.shape[1] != STATE_DIM or w2.shape != (3, w0.shape[0]):
            raise ValueError(f"{path}: controller weights have shapes {list(w0.shape)} and "
                             f"{list(w2.shape)}; expected [hidden, {STATE_DIM}] and [3, hidden]")
        controller = cls(hidden_dim=w0.shape[0], exit_threshold=exit_threshold)
        # The file's keys belong to ANEE's module (attribute `net`); ours is the Sequential itself.
        controller.net.load_state_dict({k[len("net."):]: v for k, v in state.items()})
        return controller

    def to(self, device):
        self.net.to(device)
        return self

    @torch.no_grad()
    def propose(self, ctx):
        state = anee_state(ctx.h, ctx.h_prev, ctx.budget_left, ctx.layer, ctx.num_layers)
        net = self.net.to(state.device)
        codes = net(state).argmax(-1).to(torch.int8)
        return torch.where(ctx.budget_left < self.exit_threshold, EXIT, codes).to(torch.int8)


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


CONTROLLER_NAMES = ("budget", "heuristic", "learned")
TRAINED_SUFFIXES = (".safetensors", ".json")


def make_controller(controller) -> Controller:
    """Accepts a Controller, a name, a path to a controller file, or a per-layer action list.

    "learned" is the trained controller shipped for the embedded model; a directory or a
    .safetensors/.json path is a trained (budget-conditioned) controller; .pt/.pth/.bin files
    are ANEE 0.4 controllers. A name or a path gives one shared instance (a file is read again
    only when it changed): requests naming the same controller then form one group in a step,
    and its network runs once per layer for all of their rows.
    """
    if isinstance(controller, Controller):
        return controller
    if isinstance(controller, (list, tuple)):
        return StaticController(controller)
    if isinstance(controller, (str, os.PathLike)):
        name = os.fspath(controller)
        key = (name, _modified(name))
        if key not in _shared:
            _shared[key] = _build(name)
        return _shared[key]
    raise ValueError(f"unknown controller {controller!r}: use one of {', '.join(CONTROLLER_NAMES)}, "
                     "a controller file path, a list of per-layer actions, or a Controller")


_shared = {}     # (name or path, modification time) -> Controller


def _modified(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _build(name) -> Controller:
    if name == "budget":
        return BudgetController()
    if name == "heuristic":
        return HeuristicController()
    if name == "learned":
        from .trained import BudgetConditionedController, shipped_controller_path
        return BudgetConditionedController.load(shipped_controller_path())
    if os.path.isdir(name) or name.endswith(TRAINED_SUFFIXES):
        from .trained import BudgetConditionedController
        return BudgetConditionedController.load(name)
    if os.path.sep in name or name.endswith((".pt", ".pth", ".bin")) or os.path.exists(name):
        return LearnedController.from_file(name)
    raise ValueError(f"unknown controller {name!r}: use one of {', '.join(CONTROLLER_NAMES)}, "
                     "a controller file path, a list of per-layer actions, or a Controller")
