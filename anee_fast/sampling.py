"""Sampling parameters and the per-sequence sampler (greedy, temperature, top-k, top-p; seeded)."""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_k: Optional[int] = None       # None or 0 = no top-k cut
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be None or an integer >= 0, got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    def make_generator(self) -> Optional[torch.Generator]:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()            # seeds this generator only; torch's global state is left alone
        else:
            g.manual_seed(self.seed)
        return g


def sample_batch(logits: torch.Tensor, params: list, generators: list) -> list:
    """One token id per row of float32 logits [M, vocab]; a None in `params` means no token for
    that row. Greedy rows share one argmax and one transfer to the host per step."""
    greedy = logits.argmax(dim=-1).tolist()
    return [None if p is None else greedy[i] if p.temperature == 0 else _sample_row(logits[i], p, g)
            for i, (p, g) in enumerate(zip(params, generators))]


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator) -> int:
    """Temperature, top-k and top-p sampling from one row of logits [vocab], on the host."""
    logits = logits.float().cpu() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
