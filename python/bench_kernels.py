"""Kernel microbenchmark: each op of the backend contract (norm, add_norm, linear, skip_kv,
skip_adapter, paged_attention) on every usable backend against the unfused PyTorch equivalent
(the reference op). Prints a table and writes JSON and a PNG.

    python python/bench_kernels.py --rows 1,16,256,2048 --context 512 --out out/bench_kernels

Every backend's result is checked against the reference first (abort on mismatch), then timed:
median of many repeats after a warm-up: on a GPU, CUDA-event timings of a CUDA graph replaying the
op 10 times (device time without launch gaps; back-to-back calls when the op cannot be
captured); on the CPU, time.perf_counter around each call. L2 stays warm between calls unless
--cold-l2 rotates each op over copies of its inputs larger than the cache together.
Shapes: GPT-2 small (hidden 768, 12 heads, MHA, LayerNorm + biases, no RoPE), SmolLM2-135M
(hidden 576, 9 heads, 3 KV heads, RMSNorm, RoPE) and Llama-3.2-1B (hidden 2048, 32 heads, 8 KV
heads, RMSNorm, RoPE); head_dim 64 in all; skip_adapter's rank 128; linear is the MLP's
first projection with its activation (GPT-2's 3072 x 768 with bias and GELU-tanh, Llama's fused
gate|up 16384 x 2048 with gated SiLU, SmolLM2's 3072 x 576), linear_down its second one with the
residual add, linear_down_masked the same with the masked layer loop's row mask, every other row
off (the reference runs product and epilogue as separate ops; for the mask, the `where` the
masked loop launched before the mask was an epilogue). skip_adapter runs on every row (the op's
most work; a row without the adapter only copies h, which moves the same bytes).
GB/s counts the bytes an ideal fused kernel must move (byte models below); "% peak" is against
a large tensor copy measured in the same run. The Triton backend only runs on a CUDA device
(on the CPU it would be Triton's interpreter, which is no speed backend).

gemv (in --ops) times linear's product alone on the decode matrices of each --gemv-shapes model
(K|V|Q, gate|up, down and the LM head; SmolLM2-135M by default, llama-1b for a GPU's weight-only
kernels) for each weight format of --formats
(weight_formats.py: dense in the run's dtype, int8, q8_0, q4_0, q4_1) at --gemv-rows rows of x,
on the CPU with one thread and with all of them. Decode reads every weight from memory once per
token, so the weights always rotate over copies larger than the caches (as --cold-l2), and
"% read" is the bytes the call reads (weight + x) per second against a streaming read with as
many threads (torch.sum over 256 MiB) measured just before each format's timings ("read GB/s").
"hot GB/s" is the same call on one copy, its weight in the caches: the kernel's own pace, the
most "% read" could reach by streaming better (under 70% of the read, the kernel itself is the
limit).
Table, JSON rows (op "gemv") and <out>_gemv.png (% read bandwidth against rows, a panel per
matrix).

budget_controller (in --ops, not by default) times the trained controller's proposal for one layer
(ops/reference.py:budget_controller: features, the net, the rule; about 110 tensor ops in the
reference) with the shipped controller's sizes (proj_dim 8, width 32) and a random net; its codes
must equal the reference's. policy_step and saturation_codes (in --ops, not by default), the
depth policy's other ops per layer, run at the same layer (12 of 30): the budget rule, which
updates the step's spent, stopped, budget_left and actions' column in place, and the saturation
heuristic's proposals; what they return and update must equal the reference's. policy_step reads
no hidden state: its case is the same for every shape.
"""
import argparse
import statistics
import sys
import time

import torch

from anee_fast.actions import EXIT
from anee_fast.control.depth_policy import DepthAccounting
from anee_fast.ops.backends import backends, ops_for
from anee_fast.ops.weight_formats import FORMATS, nbytes, quantize
from bench_results import BenchResults
from roofline import measure_peaks

SHAPES = {
    "gpt2-small": dict(hidden=768, heads=12, kv_heads=12, d=64, rms=False, bias=True, rope=False,
                       up=3072, vocab=50257),
    "smollm2-135m": dict(hidden=576, heads=9, kv_heads=3, d=64, rms=True, bias=False, rope=True,
                         up=3072, vocab=49152),
    "llama-1b": dict(hidden=2048, heads=32, kv_heads=8, d=64, rms=True, bias=False, rope=True,
                     up=16384, vocab=128256),
}
RANK = 128           # skip_adapter's
# budget_controller's; its layers, layer, skip_cost and exit_threshold also policy_step's and
# saturation_codes' (SmolLM2-135M's 30 layers; a middle one, as layer 0 only starts the state)
CONTROLLER = dict(proj_dim=8, width=32, layers=30, layer=12, skip_cost=0.2,
                  order_position=3, order_length=20, margin=0.5, net_min_budget=0.5,
                  net_max_budget=0.9, exit_threshold=0.05)
SATURATION = dict(skip=0.98, exit=0.995)     # saturation_codes': HeuristicController's defaults
BLOCK = 16
GRAPH_CALLS = 10     # calls per timed CUDA graph replay (at least)
CPU_CACHE_BYTES = 64 << 20   # --cold-l2 on the CPU: rotate inputs over twice this
TOL = {"norm": 1e-4, "add_norm": 1e-4, "linear": 1e-4, "skip_kv": 1e-3, "skip_adapter": 1e-4,
       "paged_attention": 1e-4, "gemv": 1e-4, "budget_controller": 0.0, "policy_step": 0.0,
       "saturation_codes": 0.0}
ACTIVATION = {False: "gelu_tanh", True: "silu_gated"}    # by s["rms"]: GPT-2's, Llama's MLP
VARIANT_OF = {"linear_down": "linear", "linear_down_masked": "linear"}   # --ops label -> op
GEMV_MATRICES = ("kvq", "gate_up", "down", "lm_head")


def gemv_matrices(s) -> dict:
    """A shape's decode matrices, {name: (out_features, in_features)}: K|V|Q, the MLP's first
    projection (gate|up for a gated MLP), its down projection and the LM head."""
    inter = s["up"] // 2 if s["rms"] else s["up"]
    return {"kvq": ((s["heads"] + 2 * s["kv_heads"]) * s["d"], s["hidden"]),
            "gate_up": (s["up"], s["hidden"]), "down": (s["hidden"], inter),
            "lm_head": (s["vocab"], s["hidden"])}
READ_MIB = 256       # the streaming read the gemv rows are compared with


# ---- byte models: what an ideal (fused) kernel must read + write, in bytes ---------------------

def bytes_norm(n, s, es):
    # read x [n, hidden], weight (+ bias) [hidden]; write out [n, hidden]
    return es * (2 * n * s["hidden"] + s["hidden"] * (2 if s["bias"] else 1))


def bytes_add_norm(n, s, es):
    # read x and the residual [n, hidden], weight (+ bias) [hidden]; write the sum and the norm
    return es * (4 * n * s["hidden"] + s["hidden"] * (2 if s["bias"] else 1))


def bytes_linear(n, s, es, down=False):
    # up: read x [n, hidden], the weight [up, hidden] (+ bias [up]); write out [n, up] (half as
    # wide when gated). down: read x [n, inter], the weight [hidden, inter] (+ bias), the
    # residual [n, hidden]; write out [n, hidden]
    inter = s["up"] // 2 if s["rms"] else s["up"]
    if down:
        return es * (n * inter + s["hidden"] * inter + (s["hidden"] if s["bias"] else 0)
                     + 2 * n * s["hidden"])
    return es * (n * s["hidden"] + s["up"] * s["hidden"] + (s["up"] if s["bias"] else 0) + n * inter)


def bytes_skip_kv(n, s, es):
    # read h [n, hidden], norm weight (+ bias) [hidden], K|V weight [2 * kv, hidden] (+ bias
    # [2 * kv]); write K and V [n, kv]; read positions and slot_mapping (int64)
    kv = s["kv_heads"] * s["d"]
    weights = s["hidden"] * (2 if s["bias"] else 1) + 2 * kv * s["hidden"] + (2 * kv if s["bias"] else 0)
    return es * (n * s["hidden"] + weights + n * 2 * kv) + 8 * n * 2


def bytes_skip_adapter(n, s, es):
    # read h [n, hidden], norm weight (+ bias) [hidden], down [RANK, hidden], up [hidden, RANK]
    # (+ bias [hidden]); write out [n, hidden]; read row_mask (bool)
    H = s["hidden"]
    return es * (2 * n * H + H * (3 if s["bias"] else 1) + 2 * RANK * H) + n


def bytes_paged_attention(n, s, es, ctx):
    # read q, write out [n, heads, d]; read each row's visible K and V (ctx keys of its own
    # sequence, [ctx, kv_heads, d] each); read block tables (int64), seq_idx, positions
    return es * (2 * n * s["heads"] * s["d"] + 2 * n * ctx * s["kv_heads"] * s["d"]) \
        + 8 * n * (ctx // BLOCK + 2)


def bytes_budget_controller(n, s, es):
    # read h and h_prev [n, hidden], budget and budget_left (float32 [n]), the net (float32:
    # scalar_mean and scalar_std [8], proj [P, hidden], inp [W, 8 + P] + bias, the layer's
    # embedding row [W], hidden [W, W] + bias, out [1, W] + bias); write the codes (int8 [n])
    P, W = CONTROLLER["proj_dim"], CONTROLLER["width"]
    net = 16 + P * s["hidden"] + W * (8 + P) + 2 * W + W * W + W + W + 1
    return es * 2 * n * s["hidden"] + 4 * (2 * n + net) + n


def bytes_policy_step(n):
    # read proposed (int8), stopped (bool), spent, allowed, limit (float32) [n]; write the
    # action (int8, actions[:, layer]), stopped and the PROCESS mask (bool), spent and
    # budget_left (float32) [n]
    return n * (1 + 1 + 3 * 4) + n * (1 + 2 * 1 + 2 * 4)


def bytes_saturation_codes(n, s, es):
    # read h and h_prev [n, hidden], budget_left (float32 [n]); write the codes (int8 [n])
    return es * 2 * n * s["hidden"] + 4 * n + n


# ---- inputs: (args for the op, the indices of the args it updates in place, bytes) ------------

def make_case(op, s, n, ctx, device, dtype, g, variant):
    H, kvh, d = s["hidden"], s["kv_heads"], s["d"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    if op == "norm":
        args = (rnd(n, H), 1 + rnd(H, scale=0.3), rnd(H, scale=0.3) if s["bias"] else None, 1e-5, s["rms"])
        return args, None, bytes_norm(n, s, dtype.itemsize)
    if op == "add_norm":
        args = (rnd(n, H), rnd(n, H), 1 + rnd(H, scale=0.3), rnd(H, scale=0.3) if s["bias"] else None,
                1e-5, s["rms"])
        return args, None, bytes_add_norm(n, s, dtype.itemsize)
    if op == "linear" and variant == "linear":
        args = (rnd(n, H), rnd(s["up"], H, scale=H ** -0.5), rnd(s["up"], scale=0.3) if s["bias"] else None,
                ACTIVATION[s["rms"]])
        return args, None, bytes_linear(n, s, dtype.itemsize)
    if op == "linear":
        inter = s["up"] // 2 if s["rms"] else s["up"]
        args = (rnd(n, inter), rnd(H, inter, scale=inter ** -0.5), rnd(H, scale=0.3) if s["bias"] else None,
                "none", rnd(n, H))
        if variant == "linear_down_masked":
            args += (torch.arange(n, device=device) % 2 == 0,)
        return args, None, bytes_linear(n, s, dtype.itemsize, down=True)
    if op == "skip_kv":            # one layer's weights and cache, as the layer loop passes them
        num_slots = max(2 * n, 64)
        slots = torch.randperm(num_slots, generator=g)[:n].to(device)
        k_cache = torch.zeros((num_slots + 1, kvh, d), device=device, dtype=dtype)
        v_cache = torch.zeros((num_slots + 1, kvh, d), device=device, dtype=dtype)
        kv = 2 * kvh * d
        inv_freq = (1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).to(device) \
            if s["rope"] else None
        args = (rnd(n, H), 1 + rnd(H, scale=0.3), rnd(H, scale=0.3) if s["bias"] else None,
                rnd(kv, H, scale=H ** -0.5), rnd(kv, scale=0.3) if s["bias"] else None,
                torch.randint(0, 4096, (n,), generator=g).to(device), inv_freq, 1.0,
                k_cache, v_cache, slots, 1e-5, s["rms"])
        return args, (8, 9), bytes_skip_kv(n, s, dtype.itemsize)
    if op == "skip_adapter":
        args = (rnd(n, H), 1 + rnd(H, scale=0.3), rnd(H, scale=0.3) if s["bias"] else None,
                rnd(RANK, H, scale=H ** -0.5), rnd(H, RANK, scale=RANK ** -0.5),
                rnd(H, scale=0.3) if s["bias"] else None,
                torch.ones(n, dtype=torch.bool, device=device), 1e-5, s["rms"])
        return args, None, bytes_skip_adapter(n, s, dtype.itemsize)
    if op == "budget_controller":
        c = CONTROLLER
        P, W = c["proj_dim"], c["width"]
        f32 = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device)
        h = rnd(n, H)
        budget = torch.rand(n, generator=g).to(device)
        net = (f32(8), 1 + torch.rand(8, generator=g).to(device), f32(P, H, scale=H ** -0.5),
               f32(W, 8 + P, scale=0.5), f32(W), f32(c["layers"], W), f32(W, W, scale=W ** -0.5),
               f32(W), f32(1, W, scale=W ** -0.5), f32(1))
        args = (h, h + rnd(n, H, scale=0.3), budget, budget * torch.rand(n, generator=g).to(device),
                *net, c["layer"], c["layers"], c["skip_cost"], c["order_position"],
                c["order_length"], c["margin"], c["net_min_budget"], c["net_max_budget"],
                c["exit_threshold"])
        return args, None, bytes_budget_controller(n, s, dtype.itemsize)
    if op == "policy_step":
        # a step's state `layer` layers in, as the rule left it after proposals mostly PROCESS,
        # some SKIP, a few EXIT, for budgets from 0.3 to 1 (limit, allowed as DepthPolicy's).
        # Timing repeats the call on this state (spent grows, tokens stop): the same work per row.
        c = CONTROLLER
        L, layer, cost = c["layers"], c["layer"], c["skip_cost"]
        _, limit, allowed = DepthAccounting(L, cost).budget_terms(0.3 + 0.7 * torch.rand(n, generator=g))
        odds = torch.tensor([0.6, 0.38, 0.02])              # PROCESS, SKIP, EXIT
        propose = lambda: torch.multinomial(odds, n, replacement=True, generator=g).to(torch.int8)
        commitment = lambda l: 1 + (L - l - 1) * cost       # DepthPolicy's, no forced last layers
        state = (torch.zeros(n), torch.zeros(n, dtype=torch.bool), allowed, limit, torch.zeros(n),
                 torch.zeros((n, L), dtype=torch.int8))     # spent, stopped, ..., budget_left, actions
        for l in range(layer):
            ops_for("reference").policy_step(propose(), *state, l, commitment(l), cost, EXIT, False)
        args = tuple(t.to(device) for t in (propose(), *state))
        return args + (layer, commitment(layer), cost, EXIT, False), (1, 2, 5, 6), bytes_policy_step(n)
    if op == "saturation_codes":
        # h_prev = h + noise of relative scale sigma: cosine about 1 / sqrt(1 + sigma^2), here
        # 1 (after a SKIP), 0.90, 0.990, 0.999 (PROCESS, PROCESS, SKIP, EXIT): far enough from
        # the thresholds that no backend's summation order flips a code
        sigma = torch.tensor([0.0, 0.48, 0.14, 0.045])[torch.randint(0, 4, (n,), generator=g)]
        h = rnd(n, H)
        args = (h, h + rnd(n, H) * sigma[:, None].to(device, dtype),
                0.8 * torch.rand(n, generator=g).to(device),     # budget_left: some under the threshold
                SATURATION["skip"], SATURATION["exit"], CONTROLLER["exit_threshold"])
        return args, None, bytes_saturation_codes(n, s, dtype.itemsize)
    # paged_attention: n sequences of ctx tokens, one decode row each (at the last position),
    # blocks shuffled over the cache
    nb = (ctx + BLOCK - 1) // BLOCK
    tables = torch.randperm(n * nb, generator=g).reshape(n, nb).to(device)
    num_slots = n * nb * BLOCK
    args = (rnd(n, s["heads"], d), rnd(num_slots + 1, kvh, d), rnd(num_slots + 1, kvh, d), tables,
            torch.arange(n, device=device), torch.full((n,), ctx - 1, device=device), BLOCK,
            d ** -0.5, 0)
    return args, None, bytes_paged_attention(n, s, dtype.itemsize, ctx)


def fresh(args, mutated):
    """A copy of args whose mutated (updated in place: caches, policy state) tensors are cloned."""
    return tuple(a.clone() if i in (mutated or ()) else a for i, a in enumerate(args))


def check(op, name, ref_fn, fn, args, mutated, label):
    a_ref, a_new = fresh(args, mutated), fresh(args, mutated)
    outputs = lambda r: [] if r is None else list(r) if isinstance(r, tuple) else [r]
    # what the op returns and every tensor it updates in place
    pairs = list(zip(outputs(ref_fn(*a_ref)), outputs(fn(*a_new)), strict=True)) + \
        [(a_ref[i], a_new[i]) for i in mutated or ()]
    for e, o in pairs:
        tol = TOL[op]
        if o.dtype in (torch.bfloat16, torch.float16):   # the reference rounds each step to them: 2 ulps
            tol = max(tol, 2 * torch.finfo(o.dtype).eps)
        err = (e.float() - o.float()).abs().max().item()
        if not err <= tol * max(1.0, e.float().abs().max().item()):
            raise AssertionError(f"MISMATCH: {label}, backend {name}: max abs error {err:.3g} > "
                                 f"{tol:g} against the reference; not timing a wrong kernel")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(calls, device, budget_s, min_reps=5, max_reps=200):
    """(median seconds per call, repeats, how) of the zero-argument `calls`, run in turn (one
    call per input copy: with --cold-l2 each copy's inputs are out of cache when its turn comes).
    On a GPU a CUDA graph captures at least GRAPH_CALLS calls and its replays are timed with
    events ("graph": device time without the host's launch gaps); an op that cannot be captured
    is timed as the same calls back to back ("eager"). On the CPU each call is timed alone
    ("host"). Repeats: about budget_s of timing."""
    for fn in calls[:2]:                                 # warm-up (and Triton's compile)
        fn()
    sync(device)
    rounds = -(-GRAPH_CALLS // len(calls))
    sequence = calls * rounds if device.type == "cuda" else calls
    how, run = "host", calls[0]                           # on the CPU, run only sizes the repeats
    if device.type == "cuda":
        how, run = "graph", _graph_of(sequence)
        if run is None:
            how, run = "eager", lambda: [fn() for fn in sequence]
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    reps = int(min(max_reps, max(min_reps, budget_s / max(time.perf_counter() - t0, 1e-7))))
    times = []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / len(sequence))
    else:
        for i in range(reps):
            fn = calls[i % len(calls)]
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), reps, how


def _graph_of(sequence):
    """A function replaying the calls of `sequence` captured in one CUDA graph; None when a
    call cannot be captured (it synchronises with the host)."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            sequence[0]()                                # allocations outside the capture
            with torch.cuda.graph(graph, stream=stream):
                for fn in sequence:
                    fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


def input_copies(op_args, nbytes, cache_bytes, cold: bool) -> list:
    """The op's argument tuples to rotate through: just op_args, or with `cold` enough copies of
    every tensor that each call's inputs were evicted by the others (2x the cache, at most 64)."""
    count = min(64, max(1, -(-2 * cache_bytes // max(nbytes, 1)))) if cold else 1
    clone = lambda a: a.clone() if isinstance(a, torch.Tensor) else a
    return [op_args] + [tuple(clone(a) for a in op_args) for _ in range(count - 1)]


def measure_case(results, case, s, args, device, dtype, g, names, peak, cache_bytes):
    """One (op, shape, rows) case: each backend checked against the reference, then the
    reference and every backend that matched it timed (a mismatch is a failure, not a row)."""
    op = VARIANT_OF.get(case["op"], case["op"])
    op_args, mutated, nbytes = make_case(op, s, case["rows"], args.context, device, dtype, g,
                                         variant=case["op"])
    label = f"{case['op']} {case['shape']} rows {case['rows']}"
    ref = ops_for("reference")
    checked = [name for name in names if results.attempt(
        dict(case, backend=name),
        lambda name=name: check(op, name, getattr(ref, op), getattr(ops_for(name), op), op_args,
                                mutated, label))]
    copies = input_copies(op_args, nbytes, cache_bytes, args.cold_l2)
    t_ref = []

    def time_backend(name):
        fn = getattr(ops_for(name), op)
        t, reps, how = timed([lambda a=a: fn(*a) for a in copies], device, args.budget)
        if name == "reference":
            t_ref.append(t)
        gbs = nbytes / t / 1e9
        results.add(dict(case, backend=name,
                         context=args.context if op == "paged_attention" else None,
                         time_us=t * 1e6, bytes=nbytes, gb_s=gbs, pct_peak=100 * gbs / peak,
                         speedup_vs_ref=t_ref[0] / t, repeats=reps, timing=how,
                         input_copies=len(copies)))

    if results.attempt(dict(case, backend="reference"), lambda: time_backend("reference")):
        for name in checked:
            results.attempt(dict(case, backend=name), lambda name=name: time_backend(name))


# ---- gemv: linear's product per weight format, against a measured read bandwidth -------------

def read_bandwidth(device) -> float:
    """bytes/s of a streaming read (torch.sum over READ_MIB MiB of float32) with the current
    threads, median of 10."""
    data = torch.ones(READ_MIB * 2 ** 20 // 4, device=device)
    t, _, _ = timed([lambda: data.sum()], device, 1.0, min_reps=10, max_reps=10)
    return data.numel() * 4 / t


class threads_set:
    """torch's intra-op threads set to n for a block (None: left as they are)."""

    def __init__(self, n):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self):
        if self.n is not None:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def gemv_weight(w, fmt, device, dtype):
    return w.to(device, dtype) if fmt == "dense" else quantize(w, fmt).to(device)


def weight_copies(weight, cache_bytes) -> list:
    """The weight and enough copies that together they are twice the cache (decode reads every
    weight from memory: a copy is out of the caches when its turn comes)."""
    count = min(64, max(1, -(-2 * cache_bytes // nbytes(weight))))
    clone = (lambda w: w.clone()) if isinstance(weight, torch.Tensor) else \
        (lambda w: type(w)(w.data.clone(), w.format, w.in_features))
    return [weight] + [clone(weight) for _ in range(count - 1)]


def measure_gemv(results, args, device, dtype, names, cache_bytes, g):
    """Every (matrix, format, rows) of gemv: checked against the reference once, then timed on
    each backend with one thread and with all (CPU), against the read bandwidth measured with
    as many threads just before (a shared machine's bandwidth drifts: measured next to the
    kernel, the ratio is what the kernel made of the bandwidth it had)."""
    formats = args.formats.split(",")
    rows_list = [int(r) for r in args.gemv_rows.split(",")]
    threads = sorted({1, torch.get_num_threads()}) if device.type == "cpu" else [None]
    ref = ops_for("reference")
    matrices = [(shape, matrix, N, K) for shape in args.gemv_shapes.split(",")
                for matrix, (N, K) in gemv_matrices(SHAPES[shape]).items()]
    for shape, matrix, N, K in matrices:
        w = torch.randn(N, K, generator=g) / K ** 0.5
        for fmt in formats:
            weight = gemv_weight(w, fmt, device, dtype)
            copies = weight_copies(weight, cache_bytes)
            xs = {rows: torch.randn(rows, K, generator=g).to(device, dtype) for rows in rows_list}
            checked = {}
            for rows, x in xs.items():
                case = dict(op="gemv", shape=shape, matrix=matrix, format=fmt, rows=rows)
                checked[rows] = [name for name in names if results.attempt(
                    dict(case, backend=name),
                    lambda name=name, x=x: check("gemv", name, ref.linear, ops_for(name).linear,
                                                 (x, weight), None,
                                                 f"gemv {shape} {matrix} {fmt} rows {rows}"))]
            for n in threads:
                with threads_set(n):
                    bandwidth = read_bandwidth(device)
                for rows, x in xs.items():
                    read = nbytes(weight) + x.numel() * x.element_size()
                    case = dict(op="gemv", shape=shape, matrix=matrix, format=fmt,
                                rows=rows, threads=n)
                    for name in checked[rows]:
                        def time_it(name=name, n=n, x=x, read=read, case=case, bandwidth=bandwidth):
                            fn = ops_for(name).linear
                            with threads_set(n):
                                t, reps, how = timed([lambda c=c: fn(x, c) for c in copies], device,
                                                     args.budget)
                                hot, _, _ = timed([lambda: fn(x, weight)], device, args.budget)
                            gbs = read / t / 1e9
                            results.add(dict(case, backend=name, time_us=t * 1e6, bytes=read,
                                             gb_s=gbs, hot_gb_s=read / hot / 1e9,
                                             read_gb_s=bandwidth / 1e9,
                                             pct_read=100 * gbs * 1e9 / bandwidth, repeats=reps,
                                             timing=how, input_copies=len(copies)))
                        results.attempt(dict(case, backend=name), time_it)


def plot_gemv(results, out, device, dtype_name):
    """% of the read bandwidth against rows of x: a panel per model (a row of the figure) and
    matrix, a line per format and thread count (and backend, where several)."""
    from matplotlib.figure import Figure
    rows = [r for r in results.rows if r["op"] == "gemv"]
    if not rows:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig = Figure(figsize=(5.5 * len(GEMV_MATRICES), 4 * len(shapes)))
    grid = fig.subplots(len(shapes), len(GEMV_MATRICES), squeeze=False)
    lines = sorted({(r["format"], r["threads"] or 0, r["backend"]) for r in rows})
    backends_used = {r["backend"] for r in rows}
    panels = [(ax, shape, matrix) for axes, shape in zip(grid, shapes)
              for ax, matrix in zip(axes, GEMV_MATRICES)]
    for ax, shape, matrix in panels:
        for fmt, n, name in lines:
            pts = [(r["rows"], r["pct_read"]) for r in rows
                   if (r["shape"], r["matrix"]) == (shape, matrix) and
                   (r["format"], r["threads"] or 0, r["backend"]) == (fmt, n, name)]
            if pts:
                label = fmt + (f", {n} thr" if n else "") + (f" ({name})" if len(backends_used) > 1 else "")
                ax.plot(*zip(*sorted(pts)), "o-" if n != 1 else "o--", label=label)
        ax.axhline(100, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("rows of x")
        ax.set_ylabel("% of streaming read bandwidth")
        ax.set_title(f"{shape} {matrix} {gemv_matrices(SHAPES[shape])[matrix]}, {device}, "
                     f"x {dtype_name}", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out + "_gemv.png", dpi=120)
    print(f"wrote {out}_gemv.png", file=sys.stderr)


def print_row(r):
    if r["op"] == "gemv":
        print(f"{r['matrix']:<18} {r['shape']:<12} {r['format']:<6} {r['rows']:>5} {r['threads'] or '-':>7} "
              f"{r['backend']:<9} {r['time_us']:>10.1f} {r['bytes'] / 1e6:>8.2f} {r['gb_s']:>7.2f} "
              f"{r['pct_read']:>6.1f}% {r['read_gb_s']:>9.1f} {r['hot_gb_s']:>8.2f}", flush=True)
        return
    print(f"{r['op']:<18} {r['shape']:<11} {r['rows']:>5} {r['backend']:<9} {r['time_us']:>10.1f} "
          f"{r['bytes'] / 1e6:>8.2f} {r['gb_s']:>7.2f} {r['pct_peak']:>6.1f}% "
          f"{r['speedup_vs_ref']:>6.2f}x {r['timing']:>6}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--rows", default=None, help="comma list (default CPU 1,16,256,2048; GPU 1..4096)")
    p.add_argument("--attn-max-rows", type=int, default=None,
                   help="paged_attention runs rows up to this many sequences (default CPU 256, GPU all)")
    p.add_argument("--context", type=int, default=512, help="paged_attention context length")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--ops", default="norm,add_norm,linear,linear_down,linear_down_masked,skip_kv,"
                                    "skip_adapter,paged_attention,gemv")
    p.add_argument("--formats", default=",".join(FORMATS), help="gemv's weight formats")
    p.add_argument("--gemv-rows", default="1,4,16", help="gemv's rows of x (comma list)")
    p.add_argument("--gemv-shapes", default="smollm2-135m",
                   help="gemv's models (comma list of --shapes names; llama-1b: 0.5 GB of float "
                        "weights per LM head copy)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--budget", type=float, default=0.15, help="seconds of timing per measurement")
    p.add_argument("--cold-l2", action="store_true",
                   help="rotate each op over copies of its inputs (together twice the GPU's L2, or "
                        "128 MiB on the CPU) so that every call reads them from memory")
    p.add_argument("--out", default="out/bench_kernels")
    args = p.parse_args(argv)
    unknown = [o for o in args.ops.split(",") if o not in TOL and o not in VARIANT_OF]
    if unknown:     # e.g. write_kv or skip_kv_exit, both removed: not a silent paged_attention run
        p.error(f"unknown --ops {', '.join(unknown)}: choose from {', '.join([*TOL, *VARIANT_OF])}")
    bad = [f for f in args.formats.split(",") if f not in FORMATS]
    if bad:
        p.error(f"unknown --formats {', '.join(bad)}: choose from {', '.join(FORMATS)}")

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = [int(r) for r in args.rows.split(",")] if args.rows else \
        ([1, 16, 256, 2048] if device.type == "cpu" else [1, 4, 16, 64, 256, 1024, 2048, 4096])
    attn_max = args.attn_max_rows or (256 if device.type == "cpu" else max(rows))
    avail = backends(device)
    names = [b for b, ok in avail.items() if ok is True and b != "reference"
             and not (b == "triton" and device.type != "cuda")]
    for b, ok in avail.items():
        if ok is not True:
            print(f"# backend {b} skipped: {ok}", file=sys.stderr)
    peak = measure_peaks(device, dtype).bandwidth / 1e9
    cache_bytes = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" \
        else CPU_CACHE_BYTES
    print(f"{device}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; measured copy peak {peak:.1f} GB/s; "
          f"backends: reference, {', '.join(names)}")
    header = (f"{'op':<18} {'shape':<11} {'rows':>5} {'backend':<9} {'time us':>10} {'MB':>8} "
              f"{'GB/s':>7} {'% peak':>7} {'vs ref':>7} {'timing':>6}")
    print(header)
    meta = dict(device=str(device), dtype=str(dtype).removeprefix("torch."), torch=torch.__version__,
                threads=torch.get_num_threads(), peak_copy_gb_s=peak, context=args.context,
                cold_l2=args.cold_l2, cache_bytes=cache_bytes,
                block_size=BLOCK)
    results = BenchResults(args.out, print_row, meta=meta)
    g = torch.Generator().manual_seed(0)
    ops = args.ops.split(",")
    for shape in args.shapes.split(","):
        s = SHAPES[shape]
        for op_label in ops:
            if op_label == "gemv":
                continue
            op = VARIANT_OF.get(op_label, op_label)
            for n in rows:
                if op == "paged_attention" and n > attn_max:
                    continue
                measure_case(results, dict(op=op_label, shape=shape, rows=n), s, args,
                             device, dtype, g, names, peak, cache_bytes)

    if "gemv" in ops:
        print(f"{'gemv matrix':<18} {'shape':<12} {'format':<6} {'rows':>5} {'threads':>7} {'backend':<9} "
              f"{'time us':>10} {'MB':>8} {'GB/s':>7} {'% read':>7} {'read GB/s':>9} {'hot GB/s':>8}")
        measure_gemv(results, args, device, dtype, names, cache_bytes, g)
        plot_gemv(results, args.out, device, meta["dtype"])

    from matplotlib.figure import Figure
    shapes = args.shapes.split(",")
    fig = Figure(figsize=(5.5 * len(shapes), 4))
    axes = fig.subplots(1, len(shapes), squeeze=False)[0]
    for ax, shape in zip(axes, shapes):
        for op_label in (o for o in ops if o != "gemv"):     # gemv: its own figure
            for name in names:
                pts = [(r["rows"], r["speedup_vs_ref"]) for r in results.rows
                       if r["shape"] == shape and r["op"] == op_label and r["backend"] == name]
                if pts:
                    ax.plot(*zip(*pts), "o-", label=f"{op_label} ({name})")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows")
        ax.set_ylabel("speedup over reference (unfused PyTorch)")
        ax.set_title(f"{shape}, {device}, {meta['dtype']}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"wrote {args.out}.json and {args.out}.png", file=sys.stderr)
    results.finish()


if __name__ == "__main__":
    main()
