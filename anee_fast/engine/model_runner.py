"""Turns scheduled chunks into a step's inputs and runs the adaptive forward on them: eagerly, or
replayed from the runner's CUDA graphs (cuda_graphs.py) where a decode step qualifies."""
from dataclasses import dataclass

import torch

from ..control.base import Controller
from ..control.depth_policy import DepthPolicy
from ..control.features import lm_head_confidence
from ..model.forward import StepBatch, final_logits, run_layers
from .cuda_graphs import DecodeGraphs, run_only_if


@dataclass
class StepOutput:
    """A step's results. From a CUDA-graph step they are views of the graph's buffers, valid
    until the next step: copy what you keep."""
    logits: torch.Tensor      # float32 [rows, vocab] for the requested rows
    actions: torch.Tensor     # int8 [N, L]
    compute: torch.Tensor     # float32 [N]


@dataclass
class StepInputs:
    """A step's inputs on the host, one entry per token (tables and budgets: per sequence)."""
    token_ids: list
    positions: list
    slots: list
    tables: list              # each sequence's block table (a list of block ids)
    budgets: list             # each sequence's energy budget at its first token of the step


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
    """Runs steps of one model on its paged cache. `depth`: DepthAccounting; `ops`: the backend's
    op set. `graphs` (DecodeGraphs or None) replays decode steps; `compact` forces the layer
    loop's row compaction on or off (None: by device)."""

    def __init__(self, weights, cache, block_manager, depth, ops):
        self.weights = weights
        self.cache = cache
        self.block_manager = block_manager
        self.depth = depth
        self.ops = ops
        self.compact = None
        self.graphs = None

    @property
    def device(self):
        return self.weights.device

    def use_decode_graphs(self, max_rows: int, capture: bool, conditional_layers=False):
        """Decode steps of up to max_rows sequences from static buffers, replayed from CUDA
        graphs when `capture`; without, they run eagerly from the same buffers: what a graph
        records, on any device (for tests and profiles)."""
        if capture and self.device.type != "cuda":
            raise ValueError(f"capturing CUDA graphs needs the model on a CUDA device, not "
                             f"{self.device}")
        if conditional_layers and not capture:
            raise ValueError("conditional layers are nodes of a captured graph: pass capture=True")
        manager = self.block_manager
        longest = min(self.weights.spec.max_positions, manager.num_blocks * manager.block_size)
        self.graphs = DecodeGraphs(self, max_rows, -(-longest // manager.block_size), capture=capture,
                                   layer_guard=run_only_if if conditional_layers else None,
                                   compacted=conditional_layers == "compacted")

    def prepare(self, chunks) -> StepInputs:
        """chunks: [(sequence, n)]: its next n uncached tokens, whose blocks are allocated."""
        inputs = StepInputs([], [], [], [], [])
        for seq, n in chunks:
            first = seq.num_computed
            inputs.token_ids += seq.token_ids[first:first + n]
            inputs.positions += range(first, first + n)
            inputs.slots += [self.block_manager.slot(seq.seq_id, p) for p in range(first, first + n)]
            inputs.tables.append(self.block_manager.tables[seq.seq_id])
            inputs.budgets.append(seq.budget_at(first))
        return inputs

    def build_batch(self, chunks) -> StepBatch:
        """The eager step's device tensors."""
        inputs = self.prepare(chunks)
        width = max(len(t) for t in inputs.tables)
        padded = [t + [0] * (width - len(t)) for t in inputs.tables]
        seq_idx = [s for s, (_, n) in enumerate(chunks) for _ in range(n)]
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)
        return StepBatch(token_ids=as_long(inputs.token_ids), positions=as_long(inputs.positions),
                         seq_idx=as_long(seq_idx), slot_mapping=as_long(inputs.slots),
                         block_tables=as_long(padded), block_size=self.block_manager.block_size,
                         decode=all(n == 1 for _, n in chunks))

    def new_policy(self, num_tokens, controller=None, budget_terms=None, fixed_actions=None):
        """A DepthPolicy of this model for num_tokens rows."""
        return DepthPolicy(num_tokens, self.depth, self.device, self.ops, budget_terms=budget_terms,
                           controller=controller, fixed_actions=fixed_actions, readout=self.readout)

    def policy_for(self, chunks, num_tokens, fixed_actions=None) -> DepthPolicy:
        if fixed_actions is not None:
            return self.new_policy(num_tokens, fixed_actions=fixed_actions.to(self.device))
        terms = self.depth.budget_terms([seq.budget_at(seq.num_computed + i)
                                         for seq, n in chunks for i in range(n)])
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
        return self.new_policy(num_tokens, controller, terms.to(self.device))

    def readout(self, h):
        return lm_head_confidence(h, self.weights, self.ops)

    def forward(self, step: StepBatch, policy, hidden_states=None, compact=None, layer_guard=None,
                row_caps: tuple = ()):
        """The final residual [N, hidden] of every row of `step` (see run_layers)."""
        return run_layers(self.weights, self.cache, step, policy, self.ops, hidden_states,
                          self.compact if compact is None else compact, layer_guard, row_caps)

    def logits(self, h):
        return final_logits(self.weights, h, self.ops)

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
        h = self.forward(step, policy, hidden_states)
        rows = torch.as_tensor(logits_rows, dtype=torch.long, device=self.device)
        return StepOutput(logits=self.logits(h.index_select(0, rows)), actions=policy.actions,
                          compute=policy.compute())
