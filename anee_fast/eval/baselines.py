"""Baseline controllers for the quality comparison: random skipping and an untrained ANEE MLP."""
import torch

from ..actions import PROCESS, SKIP
from ..control.anee_mlp import ANEEMLPController
from ..control.base import Controller

class RandomSkipController(Controller):
    """SKIPs each (token, layer) independently with probability skip_prob, from a seeded generator.

    The generator lives on the device of the hidden states and is created at the first call, so
    a run is reproducible for a given seed and call order.
    """
    name = "random"

    def __init__(self, skip_prob: float, seed: int = 0):
        if isinstance(skip_prob, bool) or not isinstance(skip_prob, (int, float)) \
                or not 0.0 <= skip_prob <= 1.0:
            raise ValueError(f"skip_prob must be a number in [0, 1], got {skip_prob!r}")
        self.skip_prob = float(skip_prob)
        self.seed = int(seed)
        self._generators = {}

    def propose(self, ctx):
        device = ctx.h.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        draw = torch.rand(ctx.h.shape[0], generator=self._generators[device], device=device)
        return torch.where(draw < self.skip_prob, SKIP, PROCESS).to(torch.int8)


def random_skip_prob(budget: float, num_layers: int, skip_cost: float, min_layers: int = 0) -> float:
    """The skip probability whose expected compute is the budget (closed form).

    The free layers (after the min_layers forced ones) each cost 1 - p * (1 - skip_cost) in
    expectation. Tokens that draw more PROCESSes than the budget allows are cut by the depth
    policy, so the realised mean lands a little under the budget.
    """
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be in [0, 1], got {budget!r}")
    free = num_layers - min_layers
    if free <= 0:
        return 0.0
    per_free_layer = (budget * num_layers - min_layers) / free
    return float(min(1.0, max(0.0, (1.0 - per_free_layer) / (1.0 - skip_cost))))


def untrained_learned_controller(seed: int = 0) -> ANEEMLPController:
    """An ANEE 0.4 MLP controller with a seeded random init (torch's global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ANEEMLPController()
