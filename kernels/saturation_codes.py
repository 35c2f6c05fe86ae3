"""saturation_codes: the saturation heuristic's proposals for every token, one launch.

In PyTorch the heuristic (ops/reference.py:saturation_codes) is about twenty tiny tensor ops per
layer, each a kernel launch on a GPU. One program per row walks h and h_prev once in BLOCK_H
chunks: whether they differ anywhere, and the float32 sums for their cosine (w12 / (|h| |h_prev|),
norms clamped at 1e-8 like torch's cosine_similarity), then writes the row's code.
"""
import torch
import triton
import triton.language as tl

PROCESS = tl.constexpr(0)    # anee_fast/actions.py (a jitted kernel reads constexprs)
SKIP = tl.constexpr(1)
EXIT = tl.constexpr(2)


@triton.jit
def _saturation_codes_kernel(h_ptr, prev_ptr, left_ptr, codes_ptr, H, stride_h, stride_p,
                             skip_saturation, exit_saturation, exit_threshold,
                             BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    w11 = tl.zeros([BLOCK_H], dtype=tl.float32)
    w22 = tl.zeros([BLOCK_H], dtype=tl.float32)
    w12 = tl.zeros([BLOCK_H], dtype=tl.float32)
    differ = tl.zeros([BLOCK_H], dtype=tl.int32)
    for start in range(0, H, BLOCK_H):
        m = start + cols < H
        a = tl.load(h_ptr + row * stride_h + start + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(prev_ptr + row * stride_p + start + cols, mask=m, other=0.0).to(tl.float32)
        w11 += a * a
        w22 += b * b
        w12 += a * b
        differ |= (a != b).to(tl.int32)
    n1 = tl.maximum(tl.sqrt(tl.sum(w11, axis=0)), 1e-8)
    n2 = tl.maximum(tl.sqrt(tl.sum(w22, axis=0)), 1e-8)
    cos = tl.sum(w12, axis=0) / (n1 * n2)
    moved = tl.max(differ, axis=0) > 0                 # the previous layer changed h
    leave = (moved & (cos >= exit_saturation)) | (tl.load(left_ptr + row) < exit_threshold)
    skip = moved & (cos >= skip_saturation)
    code = tl.where(leave, EXIT, tl.where(skip, SKIP, PROCESS))
    tl.store(codes_ptr + row, code.to(tl.int8))


def saturation_codes(h, h_prev, budget_left, skip_saturation: float, exit_saturation: float,
                     exit_threshold: float):
    """See ops/reference.py:saturation_codes: int8 codes [N] for h, h_prev [N, hidden]."""
    if h.shape != h_prev.shape or h.dim() != 2 or budget_left.shape != h.shape[:1]:
        raise ValueError(f"saturation_codes: h {tuple(h.shape)} and h_prev {tuple(h_prev.shape)} "
                         f"must be one [N, hidden] shape, budget_left [N], got "
                         f"{tuple(budget_left.shape)}")
    N, H = h.shape
    codes = torch.empty(N, dtype=torch.int8, device=h.device)
    if N:
        h = h if h.stride(-1) == 1 else h.contiguous()
        h_prev = h_prev if h_prev.stride(-1) == 1 else h_prev.contiguous()
        block = min(triton.next_power_of_2(max(H, 1)), 1024)
        _saturation_codes_kernel[(N,)](
            h, h_prev, budget_left.float().contiguous(), codes, H, h.stride(0), h_prev.stride(0),
            float(skip_saturation), float(exit_saturation), float(exit_threshold),
            BLOCK_H=block, num_warps=4)
    return codes
