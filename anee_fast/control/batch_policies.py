"""Batch-aware depth decisions: a layer's weights are read if ANY row of the step processes it,
so independent per-token decisions rarely skip a whole layer in a batch.

`ConsensusController` wraps a per-token controller and turns its proposals into one decision
per layer for the whole step: PROCESS for every row when at least `quorum` of the rows that
are still running vote PROCESS, SKIP for every row otherwise. The DepthPolicy still applies
each row's own budget afterwards, so no row overspends; rows that already exited stay out.
"""
import torch

from ..actions import EXIT, PROCESS, SKIP
from .base import Controller
from .registry import make_controller

class ConsensusController(Controller):
    name = "consensus"

    def __init__(self, inner, quorum: float = 0.5):
        if isinstance(quorum, bool) or not isinstance(quorum, (int, float)) or not 0.0 < quorum <= 1.0:
            raise ValueError(f"quorum must be a fraction in (0, 1], got {quorum!r}")
        self.inner = make_controller(inner)
        self.quorum = float(quorum)

    @property
    def graph_safe(self):
        return self.inner.graph_safe

    @property
    def reads_h_prev(self):
        return getattr(self.inner, "reads_h_prev", True)

    def check_model(self, num_layers, hidden_size):
        self.inner.check_model(num_layers, hidden_size)

    def propose(self, ctx):
        proposal = self.inner.propose(ctx)
        running = proposal != EXIT
        votes = ((proposal == PROCESS) & running).sum()
        together = votes >= self.quorum * running.sum().clamp(min=1)       # a device scalar
        return torch.where(running, torch.where(together, PROCESS, SKIP), EXIT).to(torch.int8)
