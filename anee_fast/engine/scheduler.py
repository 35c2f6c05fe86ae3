"""Chooses which sequences run in a step and how many of their tokens.

Each sequence has tokens whose K/V are not yet cached (the rest of its prompt, or its newest
token). A step gives running sequences their tokens first, then admits waiting ones, within a
token budget per step and the free KV blocks. A running sequence that cannot grow preempts the
most recently admitted one, which gives back its blocks and is recomputed later. This is the one
place that allocates KV blocks: generation, scoring and the ANEE drop-in's forward all go
through it (a sequence's `chunk_size` caps its tokens per step).
"""
from collections import deque

from .sequence import SequenceStatus


class Scheduler:
    def __init__(self, block_manager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting = deque()
        self.running = []
        self.num_preemptions = 0       # since start, for the serving metrics

    def add(self, seq) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list:
        """[(sequence, number of its tokens to compute now)]."""
        chunks, budget = [], self.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:   # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget, seq.chunk_size or budget)
            while not self.block_manager.can_allocate(seq.seq_id, seq.num_computed + n):
                self._preempt(self.running[-1])
                if seq.status is not SequenceStatus.RUNNING:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.allocate(seq.seq_id, seq.num_computed + n)
                chunks.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget, seq.chunk_size or budget)
            if not self.block_manager.can_allocate(seq.seq_id, seq.num_computed + n):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq.seq_id, seq.num_computed + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append((seq, n))
            budget -= n
        return chunks

    def _preempt(self, seq) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        self.num_preemptions += 1
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq, reason: str, free_blocks: bool = True) -> None:
        """Ends a running sequence; free_blocks=False leaves its KV blocks to its owner."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        if free_blocks:
            self.block_manager.free(seq.seq_id)

    def remove(self, seq, reason: str, free_blocks: bool = True) -> None:
        """Ends a sequence wherever it is (running or waiting); nothing if it is in neither."""
        if seq in self.running:
            self.finish(seq, reason, free_blocks)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = reason
            if free_blocks:
                self.block_manager.free(seq.seq_id)
