"""One request's tokens, progress through the model, and trace."""
import itertools
import time
from enum import Enum

import torch

from ..trace import Trace

_ids = itertools.count()


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, prompt_ids, sampling, budget: float, controller, num_layers: int,
                 skip_cost: float, max_len: int, prompt_budget: float = None):
        self.seq_id = next(_ids)
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling = sampling
        self.generator = sampling.make_generator()
        self.budget = budget                    # of every generated token
        self.prompt_budget = budget if prompt_budget is None else prompt_budget
        self.controller = controller
        self.skip_cost = skip_cost
        self.max_len = max_len                  # prompt + the most tokens it may generate
        self.num_computed = 0                   # tokens whose K/V are in the cache
        self.chunk_size = None                  # most tokens per step (None: the scheduler's limit)
        self.fixed_actions = None               # int8 [tokens, L]: run these, no controller
        self.status = SequenceStatus.WAITING
        self.finish_reason = None
        self.arrival_time = time.perf_counter()
        self.token_times = []                   # perf_counter() when each generated token came
        self._actions = torch.zeros((max_len, num_layers), dtype=torch.int8)
        self._compute = torch.zeros(max_len, dtype=torch.float32)
        self._unwritten = []                    # record()'s arguments, not yet in _actions

    def __len__(self):
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_ids(self) -> list:
        return self.token_ids[self.num_prompt_tokens:]

    def budget_at(self, position: int) -> float:
        """The energy budget of the token at `position`: a prompt token's or a generated one's
        (a recomputed generated token keeps its own)."""
        return self.prompt_budget if position < self.num_prompt_tokens else self.budget

    def record(self, start: int, actions, compute, first_row: int, n: int) -> None:
        """Tokens start..start+n ran as rows first_row.. of a step whose host actions [rows, L]
        and compute [rows] these are. Kept as given and written when `actions` or `compute` is
        read: a decode step then costs a sequence one append, not two tensor writes."""
        self._unwritten.append((start, actions, compute, first_row, n))

    @property
    def actions(self) -> torch.Tensor:
        """int8 [max_len, L]: the actions of each token run so far (later rows are zero)."""
        self._write_records()
        return self._actions

    @property
    def compute(self) -> torch.Tensor:
        """float32 [max_len]: each token's compute, as a fraction of a full forward."""
        self._write_records()
        return self._compute

    def _write_records(self) -> None:
        for start, actions, compute, first_row, n in self._unwritten:
            end = start + n
            if end > self._actions.shape[0]:   # fed beyond its planned length (ANEE forward)
                grow = end - self._actions.shape[0]
                self._actions = torch.cat([self._actions, self._actions.new_zeros(grow, self._actions.shape[1])])
                self._compute = torch.cat([self._compute, self._compute.new_zeros(grow)])
            self._actions[start:end] = actions[first_row:first_row + n]
            self._compute[start:end] = compute[first_row:first_row + n]
        self._unwritten.clear()

    def stats(self) -> dict:
        """Per-request statistics: compute spent (fraction of a full forward) and layers run per
        token over every token run so far (the trace, as `LLM.generate` reports it), time to
        first token and inter-token latency in seconds."""
        trace = self.trace()
        n_run = int(trace.compute.shape[0])
        times = [self.arrival_time] + self.token_times
        gaps = sorted(b - a for a, b in zip(times[1:], times[2:]))
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": self.num_generated,
            "energy_budget": self.budget,
            "prompt_budget": self.prompt_budget,
            "tokens_run": n_run,
            "compute": trace.mean_compute,
            "completion_compute": trace.generated_compute,
            "layers_run_mean": float(trace.layers_run.float().mean()) if n_run else 0.0,
            "num_layers": trace.actions.shape[1],
            "ttft_s": times[1] - times[0] if len(times) > 1 else None,
            "itl_mean_s": sum(gaps) / len(gaps) if gaps else None,
            "itl_p50_s": _percentile(gaps, 0.50),
            "itl_p99_s": _percentile(gaps, 0.99),
        }

    def trace(self) -> Trace:
        n = self.num_computed
        return Trace(actions=self.actions[:n].clone(), compute=self.compute[:n].clone(),
                     budget=self.budget, skip_cost=self.skip_cost,
                     num_prompt_tokens=self.num_prompt_tokens, prompt_budget=self.prompt_budget)


def _percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list (None if empty)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
