"""ANEE 0.4's learned controller: its MLP over its six-feature state, loaded from its own files."""
import os

import torch
from torch import nn

from ..actions import EXIT
from .base import Controller
from .features import STATE_DIM, anee_state


class ANEEMLPController(Controller):
    """ANEE 0.4's MLP over the six-feature state; argmax over (PROCESS, SKIP, EXIT)."""
    name = "anee-mlp"
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
