"""CUDA graphs of the decode step: one per (batch-size bucket, controller).

A decode step launches a few kernels per layer for a handful of rows; on a GPU the host's launch
time, not the device, sets its speed. A graph records the whole step once (embedding, every
layer with its on-device decisions, the LM head) and replays it with one launch.

Inputs live in static buffers: a step copies its token ids, positions, slots, block tables and
budget terms in (ModelRunner.prepare builds them on the host, whole buckets: rows past the batch
are padding, slot -1 and budget 0, so that they process only the forced layers and a conditional
layer skips when no real row runs it), replays, and hands out views of the logits, actions and
compute of its rows, valid until the next step. Nothing in the captured step reads a device
value on the host (the layer loop's rule), which is what makes it capturable.

`DecodeGraphs(..., capture=False)` runs the same static-buffer step without a graph: the CPU
tests check the padding and bucketing that way, the GPU tests the captured replays.

With `conditional_layers`, each layer's block is captured as the body of a conditional (IF)
graph node whose predicate is "some row processes this layer", computed on the device: a layer
that every row skips then costs its decision and K/V kernels only, not the block's own. With
"compacted", buckets of 16 rows and more also get bodies for a quarter and a half of their rows
(those of at least 8; PROCESS rows first): the one body whose range holds the step's PROCESS
count runs. That needs CUDA >= 12.4 and a torch whose CUDAGraph has `begin_capture_to_if_node`.
"""
import torch

from ..model.forward import StepBatch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MAX_GRAPHS = 32      # (bucket, controller) pairs kept; the oldest is dropped past this


def conditional_nodes_supported() -> bool:
    """Whether this torch can capture conditional (IF) nodes into a CUDA graph."""
    graph = torch.cuda.CUDAGraph
    return (torch.cuda.is_available() and hasattr(graph, "get_currently_capturing_graph")
            and hasattr(graph, "begin_capture_to_if_node"))


def run_only_if(pred: torch.Tensor, body) -> None:
    """Inside a graph capture: body()'s kernels become the body of an IF node that runs at
    replay only where the device bool `pred` is true (run_layers' layer_guard)."""
    graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    graph.begin_capture_to_if_node(pred)
    try:
        body()
    finally:
        graph.end_capture_to_conditional_node()


def compaction_caps(rows: int) -> tuple:
    """Row capacities of the compacted bodies below a bucket's `rows` (run_layers' row_caps)."""
    return tuple(c for c in (rows // 4, rows // 2) if c >= 8)


def bucket_for(n: int, max_rows: int):
    """The smallest bucket holding n rows; None past max_rows or the largest bucket."""
    if n > max_rows:
        return None
    return next((b for b in BUCKETS if b >= n), None)


class _StepGraph:
    """Static buffers and (when captured) the graph of one bucket's decode step."""

    def __init__(self, runner, rows: int, controller, width: int, capture: bool, layer_guard,
                 row_caps: tuple):
        device = runner.device
        self.rows = rows
        self.meta = torch.zeros((3, rows), dtype=torch.long, device=device)  # token, position, slot
        self.meta[2] = -1                                      # padding: writes nothing
        self.tables = torch.zeros((rows, width), dtype=torch.long, device=device)
        # The host's copy of the block tables, rewritten only where a row's table changed (a
        # decode step adds a block to a sequence once every block_size tokens).
        self.host_tables = torch.zeros((rows, width), dtype=torch.long)
        self.host_table_lists = [[] for _ in range(rows)]   # what each row of it holds
        self.budget_terms = torch.zeros((3, rows), dtype=torch.float32, device=device)
        self.seq_idx = torch.arange(rows, device=device)
        self.runner, self.layer_guard, self.row_caps = runner, layer_guard, row_caps
        # Built once, outside the capture: the policy's first layer starts its state each step.
        self.policy = runner.new_policy(rows, controller, budget_terms=self.budget_terms)
        self.graph = None
        if capture:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self.forward(layer_guard=None)                 # compiles kernels, warms allocators
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, stream=stream):
                    self.outputs = self.forward(layer_guard)
            torch.cuda.current_stream(device).wait_stream(stream)

    def forward(self, layer_guard):
        """The step a graph records, from the static buffers (logits, actions, compute)."""
        r = self.runner
        step = StepBatch(token_ids=self.meta[0], positions=self.meta[1], seq_idx=self.seq_idx,
                         slot_mapping=self.meta[2], block_tables=self.tables,
                         block_size=r.block_manager.block_size, decode=True)
        if layer_guard is None:
            h = r.forward(step, self.policy)
        else:
            h = r.forward(step, self.policy, compact=False, layer_guard=layer_guard,
                          row_caps=self.row_caps)
        return r.logits(h), self.policy.actions, self.policy.compute()

    def run(self, meta: torch.Tensor, tables: list, terms: torch.Tensor):
        """meta: long [3, rows] (token, position, slot) and terms: budget_terms [3, rows],
        padding rows included (host tensors: one copy each); tables: the block tables (lists)
        of the real rows, as many as there are."""
        n = len(tables)
        self._write_host_tables(tables + [[]] * (self.rows - n))
        self.meta.copy_(meta)
        self.tables.copy_(self.host_tables)
        self.budget_terms.copy_(terms)
        if self.graph is None:
            outputs = self.forward(self.layer_guard)
        else:
            self.graph.replay()
            outputs = self.outputs
        logits, actions, compute = outputs
        return logits[:n], actions[:n], compute[:n]

    def _write_host_tables(self, tables: list):
        """Rewrites the rows of host_tables whose table differs from what they hold (zero-padded
        to the width; a padding row's table is empty)."""
        for i, table in enumerate(tables):
            if table != self.host_table_lists[i]:
                row = self.host_tables[i]
                row.zero_()
                row[:len(table)] = torch.tensor(table, dtype=torch.long)
                self.host_table_lists[i] = list(table)


class DecodeGraphs:
    """The decode steps of one ModelRunner, replayed from CUDA graphs where they can be.

    A step qualifies when every row decodes one token, one controller (with `graph_safe`) serves
    them all, and the batch fits the largest bucket (<= max_rows). Block tables are padded to
    `width` blocks, the most a sequence of the model's length can hold. `layer_guard` runs each
    layer's block (masked variant): `run_only_if` for conditional layers; `compacted` adds the
    bodies of compaction_caps(bucket).
    """

    def __init__(self, runner, max_rows: int, width: int, capture: bool = True, layer_guard=None,
                 compacted: bool = False):
        if compacted and layer_guard is None:
            raise ValueError("compacted bodies need a layer_guard")
        self.runner, self.max_rows, self.width, self.capture = runner, max_rows, width, capture
        self.layer_guard = layer_guard       # run_layers' layer_guard: run_only_if, or None
        self.compacted = compacted
        self.graphs = {}       # (bucket, id(controller)) -> _StepGraph (holds the controller)

    def supports(self, chunks) -> bool:
        controller = chunks[0][0].controller
        return (all(n == 1 for _, n in chunks)
                and all(seq.controller is controller for seq, _ in chunks)
                and controller.graph_safe
                and bucket_for(len(chunks), self.max_rows) is not None)

    def run(self, chunks):
        """(logits [n, vocab], actions [n, L], compute [n]) of a qualifying decode step: views
        of the graph's outputs, valid until the next step."""
        n = len(chunks)
        bucket = bucket_for(n, self.max_rows)
        pad = bucket - n
        inputs = self.runner.prepare(chunks)
        meta = [inputs.token_ids + [0] * pad, inputs.positions + [0] * pad,
                inputs.slots + [-1] * pad]                    # padding rows: write nothing
        budgets = inputs.budgets + [0.0] * pad
        controller = chunks[0][0].controller
        key = (bucket, id(controller))
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:
                self.graphs.pop(next(iter(self.graphs)))
            caps = compaction_caps(key[0]) if self.compacted else ()
            self.graphs[key] = _StepGraph(self.runner, key[0], controller, self.width, self.capture,
                                          self.layer_guard, caps)
        return self.graphs[key].run(torch.tensor(meta, dtype=torch.long), inputs.tables,
                                    self.runner.depth.budget_terms(budgets))
