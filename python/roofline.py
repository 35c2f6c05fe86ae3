"""The roofline next to every benchmark number: device peaks measured in the same run, and a
bytes + FLOPs + launches model of a decode step under the actions it actually took.

A piece of work takes max(bytes / bandwidth, flops / peak_flops) plus one launch overhead per
kernel. The model charges what an ideal implementation of our semantics must do:
- every layer, for every row: norm + K/V projection + cache write (the SKIP path, one launch;
  it also writes the K/V of rows that EXITed);
- a layer's other weights (Q, O, MLP) are read once if ANY row of the step processes it, and
  its FLOPs and attention reads (the row's whole context of K and V) scale with those rows;
- embedding, final norm, LM head and argmax for every row.
The ideal speedup of an action matrix is time(all PROCESS) / time(actions), both by this model.
"""
import statistics
import time
from dataclasses import dataclass

import torch

from anee_fast.actions import PROCESS

BLOCK_LAUNCHES = 5      # fused block: QKV GEMV with norm prologue, attention, O + residual,
                        # MLP up with norm prologue, MLP down + residual
FIXED_LAUNCHES = 3      # embedding, final norm + LM head, argmax


@dataclass
class Peaks:
    bandwidth: float    # bytes/s of a large copy (read + write)
    flops: float        # FLOP/s of a large matmul in the benchmark's dtype
    launch_s: float     # seconds per back-to-back tiny kernel (dispatch + launch)

    def describe(self) -> str:
        return (f"measured peaks: copy {self.bandwidth / 1e9:.1f} GB/s, matmul "
                f"{self.flops / 1e12:.2f} TFLOP/s, tiny op {self.launch_s * 1e6:.1f} us")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, device, repeats):
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_peaks(device, dtype, copy_mib: int = 256) -> Peaks:
    device = torch.device(device)
    n = copy_mib * 2 ** 20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * n * 4 / _seconds(lambda: dst.copy_(src), device, 10)
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    flops = 2 * size ** 3 / _seconds(lambda: a @ a, device, 10)
    x = torch.zeros(1, device=device)
    burst = 200
    launch_s = _seconds(lambda: [x.add_(1) for _ in range(burst)], device, 5) / burst
    return Peaks(bandwidth, flops, launch_s)


def _piece(nbytes, nflops, peaks):
    return max(nbytes / peaks.bandwidth, nflops / peaks.flops)


def step_time(spec, actions: torch.Tensor, context: torch.Tensor, peaks: Peaks,
              element_size: int) -> float:
    """Model seconds of one decode step. actions: int8 [rows, L] (canonical traces: EXIT
    marks every layer after the exit); context: [rows] keys each row attends to."""
    es = element_size
    H, L = spec.hidden_size, spec.num_layers
    kv, q = spec.kv_size, spec.q_size
    inter = spec.intermediate_size * (2 if spec.activation == "silu" else 1)
    block_params = q * H + H * q + inter * H + H * spec.intermediate_size
    rows = actions.shape[0]
    process = (actions == PROCESS)
    t = 0.0
    launches = FIXED_LAUNCHES
    for l in range(L):
        # SKIP path for every row: norm + K|V weights once, h in, K/V out.
        t += _piece(es * (2 * kv * H + H + rows * (H + 2 * kv)), 2 * rows * 2 * kv * H, peaks)
        launches += 1
        n = int(process[:, l].sum())
        if n:
            ctx = context[process[:, l]].double()
            attn_bytes = es * float(2 * ctx.sum() * kv)
            attn_flops = float(4 * ctx.sum() * q)
            t += _piece(es * block_params + attn_bytes + es * n * 4 * H,
                        2 * n * block_params + attn_flops, peaks)
            launches += BLOCK_LAUNCHES
    t += _piece(es * (spec.vocab_size * H + rows * H), 2 * rows * spec.vocab_size * H, peaks)
    return t + launches * peaks.launch_s


def decode_steps(traces):
    """Per decode step: (actions [rows, L], context [rows]) from the generated tokens' traces."""
    steps = []
    num_steps = min(t.actions.shape[0] - t.num_prompt_tokens for t in traces)
    for s in range(num_steps):
        pos = [t.num_prompt_tokens + s for t in traces]
        actions = torch.stack([t.actions[p] for t, p in zip(traces, pos)])
        steps.append((actions, torch.tensor([p + 1 for p in pos])))
    return steps


def ideal_speedup(spec, traces, peaks, element_size) -> tuple:
    """(model ms per step at full depth, ideal speedup of the traces' actions over full depth)."""
    steps = decode_steps(traces)
    full = sum(step_time(spec, torch.full_like(a, PROCESS), c, peaks, element_size) for a, c in steps)
    taken = sum(step_time(spec, a, c, peaks, element_size) for a, c in steps)
    return 1e3 * full / len(steps), full / taken
