"""Every Triton kernel compiles to a cubin for sm_80 and sm_90, with no GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the real compiler
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas). That cannot happen in a process where TRITON_INTERPRET=1
was set before triton was imported (conftest does so on CPU machines: @triton.jit then builds
interpreter functions), so the compiles run once in a child process with a clean environment
(this file run as a script), which prints one JSON result per (kernel, variant, dtype, arch).
A launcher also turns an int argument equal to 1 into a constant unless the kernel names it in
do_not_specialize (the interpreter never does): the "-ints1" cases compile every kernel so.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ARCHS = (80, 90)
DTYPES = ("fp32", "bf16")
INDEX_ARGS = {"pos_ptr", "slot_ptr", "seq_ptr", "table_ptr"}                # int64 tensors
FP32_ARGS = {"inv_freq_ptr", "m_ptr", "l_ptr", "acc_ptr",          # float32 whatever the model dtype
             "spent_ptr", "allowed_ptr", "limit_ptr", "left_ptr", "values_ptr", "budget_ptr",
             "mean_ptr", "std_ptr", "proj_ptr", "inp_w_ptr", "inp_b_ptr",     # the controller net
             "layer_w_ptr", "hid_w_ptr", "hid_b_ptr", "out_w_ptr", "out_b_ptr"}
INT8_ARGS = {"proposed_ptr", "actions_ptr", "codes_ptr"}           # action codes
INT32_ARGS = {"arrivals_ptr"}                                      # counters
BOOL_ARGS = {"stopped_ptr", "process_ptr", "row_mask_ptr"}
WEIGHT_ARGS = {"w_ptr", "down_ptr", "up_ptr"}   # uint8 rows where FORMAT is a quantized one,
                                                # float32 where IS_FP32
QUANTIZED = ("int8", "q8_0", "q4_0", "q4_1")
FLOAT_ARGS = {"eps", "scale", "rope_scale", "commitment", "skip_cost", "skip_saturation",
              "exit_saturation", "exit_threshold", "num_layers_f", "remaining_cost",
              "remaining_share", "layers_left", "fixed_layers", "order_cost", "process_share",
              "order_position", "order_length", "margin"}


def _variants():
    """(name, kernel, constexprs) of every kernel in the variants the launchers use."""
    from anee_fast.kernels.add_norm import _add_norm_kernel
    from anee_fast.kernels.budget_controller import _budget_controller_kernel
    from anee_fast.kernels.linear import _gemv_kernel
    from anee_fast.kernels.saturation_codes import _saturation_codes_kernel
    from anee_fast.kernels.norm import _norm_kernel
    from anee_fast.kernels.paged_attention import _paged_attention_kernel
    from anee_fast.kernels.policy_step import _policy_step_kernel
    from anee_fast.kernels.skip_adapter import _skip_adapter_kernel
    from anee_fast.kernels.skip_kv import _skip_kv_kernel
    from anee_fast.kernels.weight_formats import _dequantize_kernel
    out = []
    for rms in (True, False):
        out.append((f"norm_rms{int(rms)}", _norm_kernel,
                    dict(RMS=rms, HAS_BIAS=not rms, BLOCK_H=1024)))
        out.append((f"add_norm_rms{int(rms)}", _add_norm_kernel,
                    dict(RMS=rms, HAS_BIAS=not rms, BLOCK_H=1024)))
    # The MLP's projections of a decode step: GPT-2's up + GELU at one row, Llama's gate|up +
    # SiLU at 8 rows, a down projection with the residual add; the masked layer loop's out
    # projection (row mask only) and down projection (row mask and residual).
    dense = dict(FORMAT="dense")
    out.append(("gemv_gelu", _gemv_kernel, dict(ACT=1, HAS_BIAS=True, HAS_RESIDUAL=False,
                                                HAS_ROW_MASK=False, BLOCK_M=1, BLOCK_N=16,
                                                BLOCK_K=256, **dense)))
    out.append(("gemv_silu_gated", _gemv_kernel, dict(ACT=2, HAS_BIAS=False, HAS_RESIDUAL=False,
                                                      HAS_ROW_MASK=False, BLOCK_M=8, BLOCK_N=16,
                                                      BLOCK_K=32, **dense)))
    out.append(("gemv_residual", _gemv_kernel, dict(ACT=0, HAS_BIAS=True, HAS_RESIDUAL=True,
                                                    HAS_ROW_MASK=False, BLOCK_M=2, BLOCK_N=16,
                                                    BLOCK_K=128, **dense)))
    out.append(("gemv_row_mask", _gemv_kernel, dict(ACT=0, HAS_BIAS=True, HAS_RESIDUAL=False,
                                                    HAS_ROW_MASK=True, BLOCK_M=1, BLOCK_N=16,
                                                    BLOCK_K=256, **dense)))
    out.append(("gemv_row_mask_residual", _gemv_kernel,
                dict(ACT=0, HAS_BIAS=False, HAS_RESIDUAL=True, HAS_ROW_MASK=True, BLOCK_M=8,
                     BLOCK_N=16, BLOCK_K=32, **dense)))
    # Quantized weights (uint8 rows, dequantized in registers), every format, in the launcher's
    # shapes: a plain GEMV at one row (no epilogue: only quantized weights take the kernel so),
    # GELU at one row, gate|up + SiLU at 8 rows, row mask + residual at 2 rows.
    for fmt, act, bias, residual, row_mask, block_m in (
            ("q8_0", 0, False, False, False, 1), ("int8", 1, True, False, False, 1),
            ("q4_0", 2, False, False, False, 8), ("q4_1", 0, True, True, True, 2)):
        out.append((f"gemv_{fmt}", _gemv_kernel,
                    dict(ACT=act, HAS_BIAS=bias, HAS_RESIDUAL=residual, HAS_ROW_MASK=row_mask,
                         BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=max(32, 256 // block_m),
                         FORMAT=fmt)))
    # Llama-like decode (RMS, RoPE, head_dim 64, one row per program) and GPT-2-like prefill
    # (LayerNorm, biases, no RoPE, 8 rows per program, head_dim 80 padded to 2 x 64).
    out.append(("skip_kv_llama", _skip_kv_kernel,
                dict(RMS=True, HAS_NORM_BIAS=False, HAS_BIAS=False, ROPE=True,
                     BLOCK_M=1, BLOCK_HALF=32, BLOCK_K=256, **dense)))
    out.append(("skip_kv_gpt2", _skip_kv_kernel,
                dict(RMS=False, HAS_NORM_BIAS=True, HAS_BIAS=True, ROPE=False,
                     BLOCK_M=8, BLOCK_HALF=64, BLOCK_K=16, **dense)))
    # Quantized K|V(|Q) rows at decode (no tl.dot): Llama-like at one row, GPT-2-like at 8 rows.
    for fmt in QUANTIZED:
        llama = fmt != "int8"
        out.append((f"skip_kv_{fmt}", _skip_kv_kernel,
                    dict(RMS=llama, HAS_NORM_BIAS=not llama, HAS_BIAS=not llama, ROPE=llama,
                         BLOCK_M=1 if llama else 8, BLOCK_HALF=4, BLOCK_K=256 if llama else 32,
                         USE_DOT=False, IS_FP32=False, FORMAT=fmt)))
    # Past 8 rows the quantized rows are dequantized to float32 first: the model dtype's rows
    # against float32 weights through tl.dot, in IEEE float32.
    out.append(("skip_kv_dequantized", _skip_kv_kernel,
                dict(RMS=True, HAS_NORM_BIAS=False, HAS_BIAS=False, ROPE=True, BLOCK_M=16,
                     BLOCK_HALF=16, BLOCK_K=64, USE_DOT=True, IS_FP32=True, **dense)))
    # Past the decode rows a quantized weight is dequantized to float32 by one launch.
    for fmt in QUANTIZED:
        out.append((f"dequantize_{fmt}", _dequantize_kernel,
                    dict(FORMAT=fmt, BLOCK_N=16, BLOCKS=4)))
    # SmolLM2-like (RMSNorm, no biases, rank 128) and GPT-2-like (LayerNorm, biases, rank 16).
    out.append(("skip_adapter_llama", _skip_adapter_kernel,
                dict(RMS=True, HAS_NORM_BIAS=False, HAS_BIAS=False, BLOCK_R=128, BLOCK_K=32,
                     BLOCK_H=32, **dense)))
    out.append(("skip_adapter_gpt2", _skip_adapter_kernel,
                dict(RMS=False, HAS_NORM_BIAS=True, HAS_BIAS=True, BLOCK_R=16, BLOCK_K=256,
                     BLOCK_H=256, **dense)))
    # Quantized adapters (both weights' uint8 rows, dequantized in registers), every format, in
    # the launcher's blocks for a 576- to 768-wide model: SmolLM2-like (RMSNorm, no biases) at
    # ranks 128 and 64, GPT-2-like (LayerNorm, biases) at rank 32 and int8's rank 16 (32 ranks a
    # block, the rest masked).
    for fmt, llama, block_r in (("q8_0", True, 128), ("q4_0", True, 64), ("q4_1", False, 32),
                                ("int8", False, 32)):
        block = max(32, min(1024, 4096 // block_r))
        out.append((f"skip_adapter_{fmt}", _skip_adapter_kernel,
                    dict(RMS=llama, HAS_NORM_BIAS=not llama, HAS_BIAS=not llama, BLOCK_R=block_r,
                         BLOCK_K=block, BLOCK_H=block, FORMAT=fmt)))
    out.append(("paged_attention", _paged_attention_kernel,
                dict(SPLIT=False, BLOCK_N=16, BLOCK_D=128, BLOCK_S=1)))
    out.append(("paged_attention_split", _paged_attention_kernel,      # merged by the last split
                dict(SPLIT=True, BLOCK_N=16, BLOCK_D=128, BLOCK_S=16)))
    out.append(("saturation_codes", _saturation_codes_kernel, dict(BLOCK_H=1024)))
    # The shipped controller's net (proj_dim 8, width 32) on SmolLM2-135M (hidden 576).
    out.append(("budget_controller", _budget_controller_kernel,
                dict(BLOCK_H=512, BLOCK_P=8, BLOCK_W=32)))
    for first in (False, True):
        for forced in (False, True):
            out.append((f"policy_step_first{int(first)}_forced{int(forced)}", _policy_step_kernel,
                        dict(FIRST=first, FORCED=forced, BLOCK=128)))
    return out


def _signature(fn, constexprs, dtype):
    """(signature, constexprs) of a launch with the kernel's int arguments as i32 values."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FP32_ARGS:
            sig[name] = "*fp32"
        elif name in INDEX_ARGS:
            sig[name] = "*i64"
        elif name in INT8_ARGS:
            sig[name] = "*i8"
        elif name in INT32_ARGS:
            sig[name] = "*i32"
        elif name in BOOL_ARGS:
            sig[name] = "*i1"
        elif name in WEIGHT_ARGS and constexprs.get("FORMAT", "dense") != "dense":
            sig[name] = "*u8"
        elif name in WEIGHT_ARGS and constexprs.get("IS_FP32") is True:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, constexprs


def _signature_ints_one(fn, constexprs, dtype):
    """(signature, constexprs) of a launch where every int argument is 1: each becomes a constant
    unless the kernel says do_not_specialize."""
    sig, constexprs = _signature(fn, constexprs, dtype)
    ones = {p.name: 1 for p in fn.params if sig[p.name] == "i32" and not p.do_not_specialize}
    return {**sig, **dict.fromkeys(ones, "constexpr")}, {**constexprs, **ones}


# (dtype, arch, signature maker, key suffix) of every compiled case
CASES = [(d, cc, _signature, "") for d in DTYPES for cc in ARCHS] + [
    ("bf16", 90, _signature_ints_one, "-ints1")]


def compile_all():
    """{key: {"ok": bool, "asm": [stages], "cubin_bytes": int, "error": str}} for every case."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    results = {}
    for name, fn, constexprs in _variants():
        for dtype, cc, signature, suffix in CASES:
            key = f"{name}-{dtype}-sm{cc}{suffix}"
            try:
                sig, consts = signature(fn, constexprs, dtype)
                src = ASTSource(fn=fn, signature=sig, constexprs=consts)
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32))
                results[key] = {"ok": True, "asm": sorted(compiled.asm),
                                "cubin_bytes": len(compiled.asm.get("cubin", b""))}
            except Exception as e:     # reported per case by the tests below
                results[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    return results


def _case_keys():
    from itertools import product
    names = ["norm_rms1", "norm_rms0", "add_norm_rms1", "add_norm_rms0", "gemv_gelu",
             "gemv_silu_gated", "gemv_residual", "gemv_row_mask", "gemv_row_mask_residual",
             *(f"gemv_{fmt}" for fmt in QUANTIZED), "skip_kv_llama", "skip_kv_gpt2",
             *(f"skip_kv_{fmt}" for fmt in QUANTIZED), "skip_kv_dequantized",
             *(f"dequantize_{fmt}" for fmt in QUANTIZED),
             "skip_adapter_llama", "skip_adapter_gpt2",
             *(f"skip_adapter_{fmt}" for fmt in QUANTIZED),
             "paged_attention", "paged_attention_split",
             "policy_step_first0_forced0", "policy_step_first0_forced1",
             "policy_step_first1_forced0", "policy_step_first1_forced1", "saturation_codes",
             "budget_controller"]
    return [f"{n}-{d}-sm{cc}{suffix}" for n, (d, cc, _, suffix) in product(names, CASES)]


@pytest.fixture(scope="module")
def compiled():
    assert importlib.util.find_spec("triton") is not None, "triton is not installed"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_variant_is_covered(compiled):
    assert sorted(compiled) == sorted(_case_keys())


@pytest.mark.parametrize("key", _case_keys())
def test_kernel_compiles_to_cubin(compiled, key):
    result = compiled[key]
    assert result["ok"], result["error"]
    assert "ptx" in result["asm"] and "cubin" in result["asm"], result["asm"]
    assert result["cubin_bytes"] > 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    print(json.dumps(compile_all()))
