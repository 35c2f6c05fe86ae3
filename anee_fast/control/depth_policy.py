"""Turns controller proposals (or a fixed action matrix) into the actions a step executes.

Budget rule: PROCESS costs 1 layer, SKIP/EXIT-fill costs `skip_cost`. A token
may spend at most max(budget, floor) * L, where floor is the cost of its forced layers. Running
layer l is allowed only if, after it, every remaining layer could still be paid for as a SKIP.
Skipping a layer leaves that test unchanged, so a token that fails it once fails it for good:
the policy then EXITs (or SKIPs up to the forced last layers).
"""
import math
from dataclasses import dataclass

import torch

from ..actions import EXIT, PROCESS, SKIP, canonical_actions, process_mask
from .base import LayerContext

_EPS = 1e-6


@dataclass(frozen=True)
class DepthAccounting:
    """How a model's depth is paid for: its layers, what a SKIP costs (a fraction of a PROCESS,
    from the weights' bytes), and the layers every token runs at the start (min_layers) and the
    end (always_last). Tools read this instead of the engine's internals."""
    num_layers: int
    skip_cost: float
    min_layers: int = 0
    always_last: int = 0

    def __post_init__(self):
        if not 0 <= self.min_layers <= self.num_layers or not 0 <= self.always_last <= self.num_layers:
            raise ValueError(f"min_layers and always_last must be in [0, {self.num_layers}], got "
                             f"{self.min_layers} and {self.always_last}")

    @property
    def forced_last(self) -> int:
        """The always-run last layers that do not overlap the first min_layers."""
        return min(self.always_last, self.num_layers - self.min_layers)

    @property
    def decidable_layers(self) -> list:
        """The layers a controller decides (neither of the forced ranges)."""
        return list(range(self.min_layers, self.num_layers - self.forced_last))

    @property
    def floor(self) -> float:
        """The least a token can spend (fraction of a full forward): its forced layers processed,
        every other layer a SKIP. The budget a token gets is max(energy_budget, this)."""
        forced = self.min_layers + self.forced_last
        return (forced + (self.num_layers - forced) * self.skip_cost) / self.num_layers

    def effective_budget(self, budget: float) -> float:
        """What a token asking for `budget` may spend: max(budget, floor)."""
        return max(budget, self.floor)

    def processable(self, budget: float) -> int:
        """How many decidable layers a token at `budget` can PROCESS, the others paid as SKIPs."""
        L, D, c = self.num_layers, len(self.decidable_layers), self.skip_cost
        k = math.floor((self.effective_budget(budget) * L - (L - D) - D * c) / (1.0 - c) + _EPS)
        return max(0, min(D, k))

    def budget_terms(self, budgets) -> torch.Tensor:
        """float32 [3, N] (host): each token's budget after the floor (what controllers see), its
        limit in layers, and the limit with the rule's tolerance. Computed on the host once per
        step, so that the step's graph holds no kernels for them."""
        L, floor = self.num_layers, self.floor
        # Python floats: for a step's few budgets cheaper than tensor ops, and the engine's host
        # time per step is time that skipping layers cannot save.
        values = torch.as_tensor(budgets, dtype=torch.float64).reshape(-1).tolist()
        limit = [max(b, floor) * L for b in values]
        return torch.tensor([[x / L for x in limit], limit, [x + _EPS for x in limit]],
                            dtype=torch.float32)


class DepthPolicy:
    """One step's depth decisions under `depth` (DepthAccounting). `budget_terms`:
    depth.budget_terms(...) of its tokens, on the device. A policy's state is started by the first
    layer's decide(), so one policy can serve step after step (a CUDA graph keeps one, built
    outside its capture). `ops`: the backend's op set (policy_step applies the rule)."""

    def __init__(self, num_tokens, depth: DepthAccounting, device, ops, budget_terms=None,
                 controller=None, fixed_actions=None, readout=None):
        num_layers = depth.num_layers
        self.L = num_layers
        self.ops = ops
        self.skip_cost = float(depth.skip_cost)
        self.actions = torch.empty((num_tokens, num_layers), dtype=torch.int8, device=device)
        self.spent = torch.empty(num_tokens, dtype=torch.float32, device=device)   # in layers
        self.fixed_process = None
        if fixed_actions is not None:
            # Traces record the canonical form (every layer after an EXIT is EXIT), so their
            # actions say what ran: PROCESS codes after an EXIT are moot.
            self.actions.copy_(canonical_actions(fixed_actions))
            self.fixed_process = process_mask(fixed_actions)
            return
        self.controller = controller
        self.readout = readout     # h -> (entropy, max prob), offered to controllers lazily
        self.min_layers = depth.min_layers
        self.always_last = depth.forced_last
        self.budget, self.limit, self.allowed = budget_terms   # budget: what controllers see
        # What a token may still spend, written by each layer's policy_step for the next
        # layer's controller: no ops of its own per layer.
        self.budget_left = torch.empty(num_tokens, dtype=torch.float32, device=device)
        # What running layer l commits a token to, in layers: l itself, every later layer as a
        # SKIP, and the forced last layers' difference to a SKIP (host floats).
        self.commitment = [1 + (num_layers - l - 1) * self.skip_cost
                           + self.always_last * (1 - self.skip_cost) for l in range(num_layers)]
        self.stopped = torch.empty(num_tokens, dtype=torch.bool, device=device)
        # PROCESS everywhere: the proposal of forced layers, and one a controller may return.
        self.no_proposal = torch.full((num_tokens,), PROCESS, dtype=torch.int8, device=device)
        # After an EXIT the remaining layers are SKIPs; with forced last layers, say SKIP.
        self.stop_code = EXIT if self.always_last == 0 else SKIP

    def decide(self, layer: int, h, h_prev) -> torch.Tensor:
        """[N] bool: which tokens run layer `layer`. Records the action and its cost."""
        if self.fixed_process is not None:
            process = self.fixed_process[:, layer]
            cost = torch.where(process, 1.0, self.skip_cost)
            if layer == 0:
                self.spent.copy_(cost)
            else:
                self.spent += cost
            return process
        L = self.L
        forced = layer < self.min_layers or layer >= L - self.always_last
        proposed = self.no_proposal
        if not forced:
            # budget_left as the previous layer's policy_step wrote it; at layer 0, all of it.
            ctx = LayerContext(layer=layer, num_layers=L, h=h, h_prev=h_prev,
                               budget_left=self.budget_left if layer else self.budget,
                               readout=lambda: self.readout(h), budget=self.budget,
                               skip_cost=self.skip_cost, all_process=self.no_proposal,
                               ops=self.ops)
            proposed = self.controller.propose(ctx)
            if proposed.dtype != torch.int8:      # a host check: no op for int8 codes
                proposed = proposed.to(torch.int8)
        # A PROCESS that breaks the budget, and any EXIT, stop the token for good: it then
        # takes stop_code. Records the action and its cost, and the budget left after it.
        return self.ops.policy_step(proposed, self.spent, self.stopped, self.allowed, self.limit,
                                    self.budget_left, self.actions, layer, self.commitment[layer],
                                    self.skip_cost, self.stop_code, forced)

    @property
    def reads_h_prev(self) -> bool:
        """Whether decide() needs the residual entering the previous layer (its controller's)."""
        return self.fixed_process is None and getattr(self.controller, "reads_h_prev", True)

    def compute(self) -> torch.Tensor:
        """Compute spent per token, as a fraction of a full forward."""
        return self.spent / self.L
