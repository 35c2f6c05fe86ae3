"""policy_step: one layer of the depth policy's budget rule for every token, one launch.

The rule (ops/reference.py:policy_step) is a dozen tiny tensor ops per layer in PyTorch; on a GPU
each is a kernel launch, and at small batch the decode step's time is its launches. One program
per BLOCK tokens applies it in float32 in the reference's order; layer 0 (FIRST) starts the
tokens' state instead of reading it. The budget left it writes for the next layer's controller
divides as IEEE does (div_rn), like the reference.
"""
import torch
import triton
import triton.language as tl

PROCESS = tl.constexpr(0)    # anee_fast/actions.py (a jitted kernel reads constexprs)
EXIT = tl.constexpr(2)


# stop_code is SKIP (1) or EXIT (2); a launcher would make the 1 a constant, not an i32 to cast.
@triton.jit(do_not_specialize=["stop_code"])
def _policy_step_kernel(proposed_ptr, spent_ptr, stopped_ptr, allowed_ptr, limit_ptr, left_ptr,
                        actions_ptr, process_ptr, N, action_stride, num_layers_f, commitment,
                        skip_cost, stop_code, FIRST: tl.constexpr, FORCED: tl.constexpr,
                        BLOCK: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = n < N
    if FIRST:
        spent = tl.zeros([BLOCK], dtype=tl.float32)
        stopped = tl.zeros([BLOCK], dtype=tl.int1)
    else:
        spent = tl.load(spent_ptr + n, mask=m, other=0.0)
        stopped = tl.load(stopped_ptr + n, mask=m, other=0) != 0
    if FORCED:
        action = tl.zeros([BLOCK], dtype=tl.int8)
        if FIRST:
            tl.store(stopped_ptr + n, stopped, mask=m)
    else:
        proposed = tl.load(proposed_ptr + n, mask=m, other=0)
        broke = (proposed == PROCESS) & (spent + commitment > tl.load(allowed_ptr + n, mask=m, other=0.0))
        stopped = stopped | (proposed == EXIT) | broke
        tl.store(stopped_ptr + n, stopped.to(tl.int1), mask=m)
        action = tl.where(stopped, stop_code.to(tl.int8), proposed)
    process = action == PROCESS
    tl.store(actions_ptr + n.to(tl.int64) * action_stride, action, mask=m)
    tl.store(process_ptr + n, process.to(tl.int1), mask=m)
    spent += tl.where(process, 1.0, skip_cost)
    tl.store(spent_ptr + n, spent, mask=m)
    left = tl.math.div_rn(tl.load(limit_ptr + n, mask=m, other=0.0) - spent, num_layers_f)
    tl.store(left_ptr + n, left, mask=m)


def policy_step(proposed, spent, stopped, allowed, limit, budget_left, actions, layer: int,
                commitment: float, skip_cost: float, stop_code: int, forced: bool):
    """See ops/reference.py:policy_step: updates spent, stopped, budget_left and
    actions[:, layer] in place; returns the PROCESS mask."""
    N = proposed.shape[0]
    if not (spent.is_contiguous() and stopped.is_contiguous() and budget_left.is_contiguous()):
        raise ValueError("policy_step: spent, stopped and budget_left must be contiguous "
                         "(updated in place)")
    process = torch.empty_like(stopped)
    if N:
        block = min(triton.next_power_of_2(N), 1024)
        _policy_step_kernel[(triton.cdiv(N, block),)](
            proposed.contiguous(), spent, stopped, allowed.contiguous(), limit.contiguous(),
            budget_left, actions[:, layer], process, N, actions.stride(0), float(actions.shape[1]),
            float(commitment), float(skip_cost), int(stop_code),
            FIRST=layer == 0, FORCED=bool(forced), BLOCK=block)
    return process
