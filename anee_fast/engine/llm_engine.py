"""The serving loop: requests in, `step()` = schedule -> run -> sample, finished sequences out."""
import math
import operator
import time

import torch

from ..control.depth_policy import DepthAccounting
from ..model.adapters import check_adapters
from ..model.weight_storage import store_adapters
from ..control.registry import make_controller
from .block_manager import BlockManager
from .config import EngineConfig
from .cuda_graphs import conditional_nodes_supported
from .kv_cache import KVCache
from .model_runner import ModelRunner
from .sampling import SamplingParams, sample_batch
from .scheduler import Scheduler
from .sequence import Sequence


def check_budget(budget, name: str = "energy_budget") -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0.0 <= budget <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {budget!r}")
    return float(budget)


def check_token_ids(tokens, name: str = "prompt_ids") -> list:
    """`tokens` as a list of Python ints: a list or tuple of integers (Python, numpy or 0-d torch
    integers), or a 1-D integer tensor or array. Anything else is refused, never coerced: int()
    would truncate 1.7 to 1, read True as 1 and "7" as 7. `name` is the caller's argument."""
    if isinstance(tokens, (str, bytes)):
        raise ValueError(f"{name} must be token ids, not text ({tokens[:40]!r}): encode it with "
                         "the tokenizer first")
    if hasattr(tokens, "ndim"):                     # a tensor or array: one transfer to a list
        if tokens.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(tokens.shape)}")
        tokens = tokens.tolist()
    if not isinstance(tokens, (list, tuple)):
        raise ValueError(f"{name} must be a list, tuple or 1-D tensor of token ids, got "
                         f"{type(tokens).__name__}")
    return [_token_id(t, name, i) for i, t in enumerate(tokens)]


def _token_id(token, name: str, position: int) -> int:
    """operator.index takes integer scalars only (Python, numpy, torch) and refuses floats and
    strings; bools are ints to Python but never token ids."""
    if not (isinstance(token, bool) or getattr(token, "dtype", None) == torch.bool):
        try:
            return operator.index(token)
        except TypeError:
            pass
    raise ValueError(f"{name} must hold integer token ids, got {token!r} "
                     f"({type(token).__name__}) at position {position}")


class LLMEngine:
    """Owns the cache, the scheduler and the model runner of one model. `ops`: the backend's op
    set; `config`: EngineConfig."""

    def __init__(self, weights, ops, config: EngineConfig = EngineConfig(), eos_token_id=None):
        spec = weights.spec
        self.weights = weights
        self.config = config
        self.eos_token_id = eos_token_id
        self.depth = DepthAccounting(spec.num_layers, weights.skip_cost(), config.min_layers,
                                     config.always_last)
        self.block_manager = BlockManager(config.kv_blocks, config.block_size)
        self.cache = KVCache(spec.num_layers, config.kv_blocks, config.block_size, spec.num_kv_heads,
                             spec.head_dim, weights.dtype, weights.device)
        self.runner = ModelRunner(weights, self.cache, self.block_manager, self.depth, ops)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        on_gpu = weights.device.type == "cuda"
        if config.cuda_graphs and not on_gpu:
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, not {weights.device}")
        if config.conditional_layers and (not on_gpu or config.cuda_graphs is False):
            raise ValueError(f"conditional_layers={config.conditional_layers!r} needs CUDA graphs: "
                             "the model on a CUDA device and cuda_graphs not False")
        if config.conditional_layers and not conditional_nodes_supported():
            raise ValueError(f"conditional_layers={config.conditional_layers!r} needs a torch whose "
                             "CUDA graphs capture conditional nodes "
                             "(CUDAGraph.begin_capture_to_if_node, CUDA >= 12.4); torch "
                             f"{torch.__version__} has none")
        if on_gpu and config.cuda_graphs is not False:
            self.use_decode_graphs(capture=True, conditional_layers=config.conditional_layers)

    def use_decode_graphs(self, capture: bool, conditional_layers=False):
        """Decode steps from the runner's static buffers, replayed from CUDA graphs when
        `capture` (ModelRunner.use_decode_graphs), for batches up to max_num_seqs."""
        self._graph_settings = (capture, conditional_layers)
        self.runner.use_decode_graphs(self.config.max_num_seqs, capture, conditional_layers)

    def set_adapters(self, adapters) -> None:
        """Runs SKIPs with these skip adapters (one SkipAdapter per layer; None: none) from the
        next step on. A SKIP's cost, and with it what each budget buys, follows their bytes;
        decode graphs are captured again. Only between requests."""
        if self.has_unfinished():
            raise RuntimeError("skip adapters change only between requests: this engine has "
                               "unfinished ones")
        spec, weights = self.weights.spec, self.weights
        if adapters is not None:
            check_adapters(adapters, spec.num_layers, spec.hidden_size)
            adapters = store_adapters(adapters, weights)
        weights.adapters = adapters
        self.depth = DepthAccounting(spec.num_layers, weights.skip_cost(), self.config.min_layers,
                                     self.config.always_last)
        self.runner.depth = self.depth
        if self.runner.graphs is not None:
            self.use_decode_graphs(*self._graph_settings)

    def new_sequence(self, prompt_ids, sampling: SamplingParams, budget, controller,
                     name: str = "prompt_ids", prompt_budget=None) -> Sequence:
        """Validates a request and makes its Sequence (not yet scheduled). `name`: the caller's
        argument holding the prompt, for the errors. prompt_budget: the budget of the prompt's
        tokens (None: `budget`, like every generated token's)."""
        spec = self.weights.spec
        ids = check_token_ids(prompt_ids, name)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if min(ids) < 0 or max(ids) >= spec.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {spec.vocab_size}), got "
                             f"min {min(ids)}, max {max(ids)}")
        if len(ids) > spec.max_positions:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's "
                             f"{spec.max_positions} positions")
        budget = check_budget(budget)
        prompt_budget = budget if prompt_budget is None else check_budget(prompt_budget,
                                                                          "prompt_budget")
        max_len = min(len(ids) + sampling.max_tokens, spec.max_positions)
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if max_len > capacity:
            raise ValueError(f"the request needs up to {max_len} tokens of KV cache, the cache holds "
                             f"{capacity} ({self.block_manager.num_blocks} blocks of "
                             f"{self.block_manager.block_size}): raise num_kv_blocks")
        controller = make_controller(controller)
        controller.check_model(spec.num_layers, spec.hidden_size)
        return Sequence(ids, sampling, budget, controller, spec.num_layers, self.depth.skip_cost,
                        max_len, prompt_budget)

    def add_request(self, prompt_ids, sampling: SamplingParams, budget=1.0, controller="budget",
                    prompt_budget=None):
        seq = self.new_sequence(prompt_ids, sampling, budget, controller,
                                prompt_budget=prompt_budget)
        self.scheduler.add(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list:
        """Runs one batch; returns the sequences that finished in it."""
        chunks = self._schedule()
        rows, completing, start = [], [], 0
        for seq, n in chunks:
            start += n
            if seq.num_computed + n == len(seq):
                rows.append(start - 1)
                completing.append(seq)
        out = self._run(chunks, rows)
        wanted = [s.sampling if s.num_generated < s.sampling.max_tokens else None for s in completing]
        tokens = sample_batch(out.logits, wanted, [s.generator for s in completing])
        finished = []
        for seq, token in zip(completing, tokens):
            reason = self._append_token(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                finished.append(seq)
        return finished

    def compute(self, seqs, keep_blocks: bool = False) -> list:
        """Computes every uncached token of `seqs`, sequences that sample nothing (scoring; the
        ANEE drop-in's forward over its cache), through the scheduler like any request; returns
        each sequence's float32 logits [its uncached tokens, vocab] on the model's device.

        keep_blocks: the sequences keep their KV blocks afterwards, so a later call can extend
        them (the caller frees them); else they are freed. On an error every sequence is
        dropped from the scheduler (its blocks kept or freed the same way).
        """
        if self.has_unfinished():
            raise RuntimeError("compute() needs an idle engine: requests are still in flight")
        firsts = [seq.num_computed for seq in seqs]
        vocab, device = self.weights.spec.vocab_size, self.weights.device
        logits = [torch.empty((len(seq) - first, vocab), dtype=torch.float32, device=device)
                  for seq, first in zip(seqs, firsts)]
        index = {id(seq): i for i, seq in enumerate(seqs)}
        for seq in seqs:
            self.scheduler.add(seq)
        try:
            while self.has_unfinished():
                chunks = self._schedule()
                positions = [seq.num_computed for seq, _ in chunks]
                out = self._run(chunks, range(sum(n for _, n in chunks)))
                step_logits, row = out.logits.float(), 0
                for (seq, n), p in zip(chunks, positions):
                    i = index[id(seq)]
                    # A preempted sequence recomputes tokens of an earlier call: not returned.
                    lo = max(p, firsts[i])
                    logits[i][lo - firsts[i]:p + n - firsts[i]] = step_logits[row + lo - p:row + n]
                    row += n
                    if seq.num_uncomputed == 0:
                        self.scheduler.finish(seq, "length", free_blocks=not keep_blocks)
        except BaseException:
            for seq in seqs:
                self.scheduler.remove(seq, "abort", free_blocks=not keep_blocks)
            raise
        return logits

    def _schedule(self) -> list:
        chunks = self.scheduler.schedule()
        if not chunks:
            raise RuntimeError("no sequence can be scheduled: the KV cache is too small for any "
                               "waiting request")
        return chunks

    def _run(self, chunks, logits_rows):
        """Computes [(sequence, n)] (blocks allocated by the scheduler) in one step; records every
        token's actions and compute and advances the sequences. Returns the runner's StepOutput
        (logits for `logits_rows`)."""
        fixed = [seq.fixed_actions is not None for seq, _ in chunks]
        fixed_actions = None
        if any(fixed):
            if not all(fixed):
                raise RuntimeError("a step mixes sequences with fixed actions and controlled ones")
            fixed_actions = torch.cat([seq.fixed_actions[seq.num_computed:seq.num_computed + n]
                                       for seq, n in chunks])
        out = self.runner.run(chunks, logits_rows, fixed_actions)
        # Once per step, after the layers; copies even on the CPU, where the outputs of a graph
        # step are its static buffers: the sequences keep these tensors (Sequence.record).
        actions, compute = out.actions.to("cpu", copy=True), out.compute.to("cpu", copy=True)
        start = 0
        for seq, n in chunks:
            seq.record(seq.num_computed, actions, compute, start, n)
            seq.num_computed += n
            start += n
        return out

    def _append_token(self, seq, token):
        """Appends a sampled token (None: the sequence may generate no more); returns a finish
        reason or None."""
        params = seq.sampling
        if token is None:
            return "length"
        seq.token_ids.append(token)
        seq.token_times.append(time.perf_counter())
        stops = set(params.stop_token_ids)
        if not params.ignore_eos and self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        if token in stops:
            return "stop"
        if seq.num_generated >= params.max_tokens or len(seq) >= seq.max_len:
            return "length"
        return None

    def abort(self, seq) -> None:
        self.scheduler.remove(seq, "abort")
