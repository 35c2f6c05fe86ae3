"""Turns controller proposals (or a fixed action matrix) into the actions a step executes.

Budget rule (BRIEF section 2): PROCESS costs 1 layer, SKIP/EXIT-fill costs `skip_cost`. A token
may spend at most max(budget, floor) * L, where floor is the cost of its forced layers. Running
layer l is allowed only if, after it, every remaining layer could still be paid for as a SKIP.
Skipping a layer leaves that test unchanged, so a token that fails it once fails it for good:
the policy then EXITs (or SKIPs up to the forced last layers).
"""
import torch

from ..ops import reference as reference_ops
from ..actions import EXIT, PROCESS, SKIP, canonical_actions, process_mask
from .controllers import LayerContext

_EPS = 1e-6


def budget_floor(num_layers: int, skip_cost: float, min_layers: int = 0, always_last: int = 0) -> float:
    """The least a token can spend (fraction of a full forward): its forced layers processed,
    every other layer a SKIP. The budget a token gets is max(energy_budget, this)."""
    min_layers = min(min_layers, num_layers)
    forced = min_layers + min(always_last, num_layers - min_layers)
    return (forced + (num_layers - forced) * skip_cost) / num_layers


def budget_terms(budgets, num_layers: int, skip_cost: float, min_layers: int = 0,
                 always_last: int = 0) -> torch.Tensor:
    """float32 [3, N] (host): each token's budget after the floor (what controllers see), its
    limit in layers, and the limit with the rule's tolerance. Computed on the host once per step,
    so that the step's graph holds no kernels for them."""
    floor = budget_floor(num_layers, skip_cost, min_layers, always_last)
    # Python floats: for a step's few budgets cheaper than tensor ops, and the engine's host
    # time per step is time that skipping layers cannot save.
    values = torch.as_tensor(budgets, dtype=torch.float64).reshape(-1).tolist()
    limit = [max(b, floor) * num_layers for b in values]
    return torch.tensor([[x / num_layers for x in limit], limit, [x + _EPS for x in limit]],
                        dtype=torch.float32)


class DepthPolicy:
    """One step's depth decisions. `budget_terms`: budget_terms(...) of its tokens, on the
    device. A policy's state is started by the first layer's decide(), so one policy can serve
    step after step (a CUDA graph keeps one, built outside its capture)."""

    def __init__(self, num_tokens, num_layers, skip_cost, device, budget_terms=None,
                 controller=None, fixed_actions=None, min_layers=0, always_last=0, readout=None,
                 ops=reference_ops):
        self.L = num_layers
        self.ops = ops             # the backend's op set: policy_step applies the rule
        self.skip_cost = float(skip_cost)
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
        self.min_layers = min(min_layers, num_layers)
        self.always_last = min(always_last, num_layers - self.min_layers)
        self.budget, self.limit, self.allowed = budget_terms   # budget: what controllers see
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
            # Layer 0 nothing is spent yet (spent is only started by this layer's policy_step).
            budget_left = (lambda: (self.limit - self.spent) / L) if layer else self.budget
            ctx = LayerContext(layer=layer, num_layers=L, h=h, h_prev=h_prev,
                               budget_left=budget_left,
                               readout=lambda: self.readout(h), budget=self.budget,
                               skip_cost=self.skip_cost, all_process=self.no_proposal,
                               ops=self.ops)
            proposed = self.controller.propose(ctx).to(torch.int8)
        # A PROCESS that breaks the budget, and any EXIT, stop the token for good: it then
        # takes stop_code. Records the action and its cost.
        return self.ops.policy_step(proposed, self.spent, self.stopped, self.allowed, self.actions,
                                    layer, self.commitment[layer], self.skip_cost, self.stop_code,
                                    forced)

    @property
    def reads_h_prev(self) -> bool:
        """Whether decide() needs the residual entering the previous layer (its controller's)."""
        return self.fixed_process is None and getattr(self.controller, "reads_h_prev", True)

    def compute(self) -> torch.Tensor:
        """Compute spent per token, as a fraction of a full forward."""
        return self.spent / self.L
