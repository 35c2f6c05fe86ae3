"""What every controller is: a batched function from a layer's context to proposed action
codes [N] int8.

A controller only proposes. `DepthPolicy` applies min_layers, EXIT stickiness and the budget,
so no controller can overspend. Every decision is a device tensor: nothing here reads a value
back to the host.
"""
from typing import Callable

import torch

from ..actions import PROCESS


class LayerContext:
    """What a controller sees at one layer. `budget_left`: [N] compute still allowed, as a
    fraction of a full forward (DepthPolicy's buffer, which the layer's policy_step then
    overwrites: copy it to keep it). `readout` is computed on call only (an LM-head product).
    `ops`: the backend's op set, for controllers with an op of their own."""

    def __init__(self, layer: int, num_layers: int, h: torch.Tensor, h_prev: torch.Tensor,
                 budget_left: torch.Tensor, *, ops, readout: Callable = None,
                 budget: torch.Tensor = None, skip_cost: float = 0.0,
                 all_process: torch.Tensor = None):
        self.layer = layer
        self.num_layers = num_layers
        self.h = h                       # [N, hidden] residual entering the layer
        self.h_prev = h_prev             # [N, hidden] residual entering the previous layer
        self.budget_left = budget_left
        self.readout = readout           # () -> (entropy, max prob) of the LM head at this depth
        self.budget = budget             # [N] the token's whole budget (after the floor)
        self.skip_cost = skip_cost       # cost of a SKIP as a fraction of a PROCESS
        self._all_process = all_process
        self.ops = ops

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
    # tensors only, no host reads, no state carried from one step to the next (engine/cuda_graphs.py).
    graph_safe = False
    # False when propose() never reads ctx.h_prev: where the residual is updated in place (a
    # graph's conditional layers) the layer loop then keeps no copy of it.
    reads_h_prev = True

    def propose(self, ctx: LayerContext) -> torch.Tensor:
        raise NotImplementedError

    def check_model(self, num_layers: int, hidden_size: int) -> None:
        """Raises ValueError when this controller cannot serve a model of that shape; the engine
        asks before a request is queued, so a mismatch never fails a shared step."""
