"""What a run did: the action of every token at every layer and the compute each token spent."""
from dataclasses import dataclass

import torch

from .actions import PROCESS


@dataclass
class Trace:
    actions: torch.Tensor      # int8 [tokens, L]; EXIT marks the exit layer and every later one
    compute: torch.Tensor      # float32 [tokens]: fraction of a full forward spent by each token
    budget: float              # the energy budget asked for (of every generated token)
    skip_cost: float           # cost of a SKIP as a fraction of a PROCESS
    num_prompt_tokens: int = 0
    prompt_budget: float = None   # the prompt tokens' budget (None: `budget`)

    def __post_init__(self):
        if self.prompt_budget is None:
            self.prompt_budget = self.budget

    @property
    def layers_run(self) -> torch.Tensor:
        """Layers PROCESSed per token."""
        return (self.actions == PROCESS).sum(dim=1)

    @property
    def mean_compute(self) -> float:
        return float(self.compute.mean()) if self.compute.numel() else 0.0

    @property
    def generated_compute(self) -> float:
        """Mean compute of the tokens read after the prompt: generated tokens fed back (the ones
        `budget` governs); 0.0 when none was."""
        after = self.compute[self.num_prompt_tokens:]
        return float(after.mean()) if after.numel() else 0.0

    @property
    def compute_saved(self) -> float:
        return 1.0 - self.mean_compute

    def summary(self) -> str:
        L = self.actions.shape[1]
        runs = self.layers_run.float()
        prompt = (f", prompt budget {self.prompt_budget:.0%}"
                  if self.prompt_budget != self.budget else "")
        return (f"{self.actions.shape[0]} tokens, layers run per token: mean {runs.mean():.1f} of {L} "
                f"(min {int(runs.min())}, max {int(runs.max())}); compute {self.mean_compute:.1%} of "
                f"full (budget {self.budget:.0%}{prompt}), saved {self.compute_saved:.1%}")
