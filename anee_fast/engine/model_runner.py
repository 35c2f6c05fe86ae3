"""Builds a step's batch from scheduled chunks and runs the adaptive forward on it."""
from dataclasses import dataclass

import torch

from ..control.controllers import Controller
from ..ops import reference as reference_ops
from ..control.depth_policy import DepthPolicy, budget_terms
from ..model.forward import StepBatch, final_logits, run_layers
from ..control.features import lm_head_confidence


@dataclass
class StepOutput:
    """A step's results. From a CUDA-graph step they are views of the graph's buffers, valid
    until the next step: copy what you keep."""
    logits: torch.Tensor      # float32 [rows, vocab] for the requested rows
    actions: torch.Tensor     # int8 [N, L]
    compute: torch.Tensor     # float32 [N]


class MixedController(Controller):
    """Lets every sequence of a batch keep its own controller: rows take their owner's proposal."""

    def __init__(self, parts):
        self.parts = parts     # [(controller, row mask [N] bool)]

    def propose(self, ctx):
        action = None
        for controller, rows in self.parts:
            proposal = controller.propose(ctx)
            action = proposal if action is None else torch.where(rows, proposal, action)
        return action


class ModelRunner:
    def __init__(self, weights, cache, block_manager, min_layers: int = 0, always_last: int = 0,
                 ops=reference_ops):
        self.weights = weights
        self.ops = ops
        self.compact = None          # row compaction in the layer loop; None = by device
        self.cache = cache
        self.block_manager = block_manager
        self.skip_cost = weights.skip_cost()
        self.min_layers = min_layers
        self.always_last = always_last
        self.graphs = None           # DecodeGraphs: decode steps replayed from CUDA graphs

    @property
    def device(self):
        return self.weights.device

    def build_batch(self, chunks) -> StepBatch:
        """chunks: [(sequence, n)]: its next n uncached tokens. Their blocks are allocated."""
        token_ids, positions, seq_idx, slots, tables = [], [], [], [], []
        for s, (seq, n) in enumerate(chunks):
            first = seq.num_computed
            token_ids += seq.token_ids[first:first + n]
            positions += range(first, first + n)
            seq_idx += [s] * n
            slots += [self.block_manager.slot(seq.seq_id, p) for p in range(first, first + n)]
            tables.append(self.block_manager.tables[seq.seq_id])
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)
        return StepBatch(token_ids=as_long(token_ids), positions=as_long(positions),
                         seq_idx=as_long(seq_idx), slot_mapping=as_long(slots),
                         block_tables=as_long(padded), block_size=self.block_manager.block_size,
                         decode=all(n == 1 for _, n in chunks))

    def policy_for(self, chunks, num_tokens, fixed_actions=None) -> DepthPolicy:
        L = self.weights.spec.num_layers
        if fixed_actions is not None:
            return DepthPolicy(num_tokens, L, self.skip_cost, self.device,
                               fixed_actions=fixed_actions.to(self.device))
        terms = self.budget_terms([seq.budget for seq, n in chunks for _ in range(n)]).to(self.device)
        by_controller = {}
        for i, (seq, _) in enumerate(chunks):
            by_controller.setdefault(id(seq.controller), (seq.controller, []))[1].append(i)
        if len(by_controller) == 1:
            controller = chunks[0][0].controller
        else:
            owners = torch.tensor([i for i, (_, n) in enumerate(chunks) for _ in range(n)]).to(self.device)
            controller = MixedController([
                (c, torch.isin(owners, torch.tensor(idx, device=self.device)))
                for c, idx in by_controller.values()])
        return DepthPolicy(num_tokens, L, self.skip_cost, self.device, budget_terms=terms,
                           controller=controller, min_layers=self.min_layers,
                           always_last=self.always_last, readout=self.readout, ops=self.ops)

    def budget_terms(self, budgets) -> torch.Tensor:
        """depth_policy.budget_terms of these per-token budgets under this model's constraints."""
        return budget_terms(budgets, self.weights.spec.num_layers, self.skip_cost, self.min_layers,
                            self.always_last)

    def readout(self, h):
        return lm_head_confidence(h, self.weights, self.ops.norm)

    @torch.inference_mode()
    def run(self, chunks, logits_rows, fixed_actions=None, hidden_states=None) -> StepOutput:
        """Computes the chunks' tokens; returns logits for `logits_rows` (indices into the step)."""
        if self.graphs is not None and fixed_actions is None and hidden_states is None \
                and self.graphs.supports(chunks):
            logits, actions, compute = self.graphs.run(chunks)
            if list(logits_rows) != list(range(len(chunks))):
                rows = torch.as_tensor(logits_rows, dtype=torch.long, device=self.device)
                logits = logits.index_select(0, rows)
            return StepOutput(logits=logits, actions=actions, compute=compute)
        step = self.build_batch(chunks)
        policy = self.policy_for(chunks, step.num_tokens, fixed_actions)
        h = run_layers(self.weights, self.cache, step, policy, self.ops, hidden_states, self.compact)
        rows = torch.as_tensor(logits_rows, dtype=torch.long, device=self.device)
        logits = final_logits(self.weights, h.index_select(0, rows), self.ops)
        return StepOutput(logits=logits, actions=policy.actions, compute=policy.compute())
