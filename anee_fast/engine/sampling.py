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
        """Refuses what the sampler would misread: Python counts a bool as an int; torch's
        generator takes a seed as uint64, so -1 would silently be 2**64 - 1 (seeds are kept to
        non-negative int64, what JSON clients send); a string of stop ids iterates characters."""
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise ValueError(f"top_k must be None or an integer >= 0, got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or \
                not all(_is_int(t) for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be a list or tuple of integer token ids, got "
                             f"{self.stop_token_ids!r}")

    def make_generator(self) -> Optional[torch.Generator]:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()            # seeds this generator only; torch's global state is left alone
        else:
            g.manual_seed(self.seed)
        return g


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def sample_batch(logits: torch.Tensor, params: list, generators: list) -> list:
    """One token id per row of float32 logits [M, vocab]; a None in `params` means no token for
    that row. Every row is drawn on the logits' device in one batch, with one transfer of the
    tokens to the host per step: greedy rows take the argmax; sampled rows their temperature,
    top-k and top-p, then a uniform from their own generator picks a token off the row's
    cumulative distribution, so a seeded request samples the same tokens in any batch."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p is not None and p.temperature > 0]
    if sampled:
        chosen = [params[i] for i in sampled]
        uniforms = [float(torch.rand((), generator=generators[i])) for i in sampled]
        tokens[sampled] = _sample_rows(logits[sampled], chosen, uniforms)
    return [None if p is None else t for p, t in zip(params, tokens.tolist())]


def _sample_rows(logits: torch.Tensor, params: list, uniforms: list) -> torch.Tensor:
    """Token ids [R] drawn from logits [R, vocab] under each row's SamplingParams, each with
    its uniform in [0, 1) (inverse transform sampling)."""
    device, vocab = logits.device, logits.shape[-1]
    column = lambda values: torch.tensor(values, dtype=torch.float32, device=device)[:, None]
    x = logits.float() / column([p.temperature for p in params])
    top_k = [min(p.top_k or vocab, vocab) for p in params]
    if min(top_k) < vocab:                       # keep each row's k largest (ties included)
        kth = x.topk(max(top_k), dim=-1).values
        kth = kth.gather(1, torch.tensor(top_k, device=device)[:, None] - 1)
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    top_p = [p.top_p for p in params]
    if min(top_p) < 1.0:                         # the smallest head of mass >= top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(dim=-1) - sorted_p < column(top_p)) | (column(top_p) >= 1.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p * keep)
    cdf = probs.cumsum(dim=-1)
    target = column(uniforms) * cdf[:, -1:]
    # The first token whose cdf passes the target: never one of probability 0.
    return torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1).squeeze(1)
