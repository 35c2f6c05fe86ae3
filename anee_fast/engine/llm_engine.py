"""The serving loop: requests in, `step()` = schedule -> run -> sample, finished sequences out."""
import math
import time
from dataclasses import replace

import torch

from ..ops import reference as reference_ops
from .block_manager import BlockManager, OutOfKVBlocks
from ..control.controllers import make_controller
from .cuda_graphs import DecodeGraphs, conditional_nodes_supported, run_only_if
from .kv_cache import KVCache
from .model_runner import ModelRunner
from .sampling import SamplingParams, sample_batch
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus


def check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0.0 <= budget <= 1.0:
        raise ValueError(f"energy_budget must be a number in [0, 1], got {budget!r}")
    return float(budget)


class LLMEngine:
    def __init__(self, weights, eos_token_id=None, block_size: int = 16, num_kv_blocks=None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, min_layers: int = 2,
                 always_last: int = 0, ops=reference_ops, cuda_graphs=None,
                 conditional_layers=False):
        spec = weights.spec
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if num_kv_blocks is None:
            num_kv_blocks = -(-8192 // block_size)
        if not 0 <= min_layers <= spec.num_layers or not 0 <= always_last <= spec.num_layers:
            raise ValueError(f"min_layers and always_last must be in [0, {spec.num_layers}]")
        self.weights = weights
        self.eos_token_id = eos_token_id
        self.block_manager = BlockManager(num_kv_blocks, block_size)
        self.cache = KVCache(spec.num_layers, num_kv_blocks, block_size, spec.num_kv_heads,
                             spec.head_dim, weights.dtype, weights.device)
        self.runner = ModelRunner(weights, self.cache, self.block_manager, min_layers, always_last,
                                  ops)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be None (on where the model is on a GPU), True or "
                             f"False, got {cuda_graphs!r}")
        on_gpu = weights.device.type == "cuda"
        if cuda_graphs and not on_gpu:
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, not {weights.device}")
        if not (isinstance(conditional_layers, bool) or conditional_layers == "compacted"):
            raise ValueError(f"conditional_layers must be False, True or 'compacted', got "
                             f"{conditional_layers!r}")
        if conditional_layers and (not on_gpu or cuda_graphs is False):
            raise ValueError(f"conditional_layers={conditional_layers!r} needs CUDA graphs: the "
                             "model on a CUDA device and cuda_graphs not False")
        if conditional_layers and not conditional_nodes_supported():
            raise ValueError(f"conditional_layers={conditional_layers!r} needs a torch whose CUDA "
                             "graphs capture conditional nodes (CUDAGraph.begin_capture_to_if_node, "
                             f"CUDA >= 12.4); torch {torch.__version__} has none")
        if on_gpu and cuda_graphs is not False:
            self.use_decode_graphs(capture=True, conditional_layers=conditional_layers)

    def use_decode_graphs(self, capture: bool, conditional_layers=False):
        """Decode steps from static buffers (cuda_graphs.DecodeGraphs), replayed from CUDA graphs
        when `capture`; without, they run eagerly from the same buffers: what a graph records,
        on any device (for tests and profiles)."""
        if capture and self.weights.device.type != "cuda":
            raise ValueError(f"capturing CUDA graphs needs the model on a CUDA device, not "
                             f"{self.weights.device}")
        if conditional_layers and not capture:
            raise ValueError("conditional layers are nodes of a captured graph: pass capture=True")
        longest = min(self.weights.spec.max_positions,
                      self.block_manager.num_blocks * self.block_manager.block_size)
        self.runner.graphs = DecodeGraphs(
            self.runner, self.scheduler.max_num_seqs, -(-longest // self.block_manager.block_size),
            capture=capture, layer_guard=run_only_if if conditional_layers else None,
            compacted=conditional_layers == "compacted")

    def new_sequence(self, prompt_ids, sampling: SamplingParams, budget, controller) -> Sequence:
        """Validates a request and makes its Sequence (not yet scheduled)."""
        spec = self.weights.spec
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if min(ids) < 0 or max(ids) >= spec.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {spec.vocab_size}), got "
                             f"min {min(ids)}, max {max(ids)}")
        if len(ids) > spec.max_positions:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's "
                             f"{spec.max_positions} positions")
        budget = check_budget(budget)
        max_len = min(len(ids) + sampling.max_tokens, spec.max_positions)
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if max_len > capacity:
            raise ValueError(f"the request needs up to {max_len} tokens of KV cache, the cache holds "
                             f"{capacity} ({self.block_manager.num_blocks} blocks of "
                             f"{self.block_manager.block_size}): raise num_kv_blocks")
        controller = make_controller(controller)
        controller.check_model(spec.num_layers, spec.hidden_size)
        return Sequence(ids, sampling, budget, controller, spec.num_layers, self.runner.skip_cost,
                        max_len)

    def add_request(self, prompt_ids, sampling: SamplingParams, budget=1.0, controller="budget"):
        seq = self.new_sequence(prompt_ids, sampling, budget, controller)
        self.scheduler.add(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list:
        """Runs one batch; returns the sequences that finished in it."""
        chunks = self.scheduler.schedule()
        if not chunks:
            raise RuntimeError("no sequence can be scheduled: the KV cache is too small for any "
                               "waiting request")
        rows, completing, start = [], [], 0
        for seq, n in chunks:
            start += n
            if seq.num_computed + n == len(seq):
                rows.append(start - 1)
                completing.append(seq)
        out = self.run_chunks(chunks, rows)
        wanted = [s.sampling if s.num_generated < s.sampling.max_tokens else None for s in completing]
        tokens = sample_batch(out.logits, wanted, [s.generator for s in completing])
        finished = []
        for seq, token in zip(completing, tokens):
            reason = self._append_token(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                finished.append(seq)
        return finished

    def run_chunks(self, chunks, logits_rows, fixed_actions=None):
        """Computes [(sequence, n)]: each sequence's next n uncached tokens, in one step.

        Allocates their KV blocks first, all or nothing (the scheduler has usually done so
        already), then records every token's actions and compute and advances the sequences.
        Returns the runner's StepOutput (logits for `logits_rows`), its actions and compute
        copied to the host.
        """
        manager = self.block_manager
        needed = sum(manager.blocks_needed(s.seq_id, s.num_computed + n) for s, n in chunks)
        if needed > manager.num_free:
            raise OutOfKVBlocks(f"this step needs {needed} more KV blocks, {manager.num_free} of "
                                f"{manager.num_blocks} are free: raise num_kv_blocks")
        for seq, n in chunks:
            manager.allocate(seq.seq_id, seq.num_computed + n)
        out = self.runner.run(chunks, logits_rows, fixed_actions)
        # Once per step, after the layers; copies even on the CPU, where the outputs of a graph
        # step are its static buffers: the sequences keep these tensors (Sequence.record).
        actions, compute = out.actions.to("cpu", copy=True), out.compute.to("cpu", copy=True)
        start = 0
        for seq, n in chunks:
            seq.record(seq.num_computed, actions, compute, start, n)
            seq.num_computed += n
            start += n
        return replace(out, actions=actions, compute=compute)

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
        if seq in self.scheduler.running:
            self.scheduler.finish(seq, "abort")
        elif seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
