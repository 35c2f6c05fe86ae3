"""The ops of the C++/CUDA extension `anee_fast._C` (backend "native").

Same names and signatures as `reference_ops` (the contract); the schemas are defined in
csrc/torch_bindings.cpp, the CPU kernels in csrc/cpu/, CUDA kernels (when built) in csrc/cuda/.
Paged attention reads only the blocks a row can see (the reference gathers the whole table).

Importing this module loads the extension; when it was not built the ImportError propagates
(backends() reports it as the reason the backend is unavailable). The fake implementations
below let torch.compile(fullgraph=True) trace the ops.
"""
from typing import Optional

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.anee_fast.*)
from .weight_formats import format_of, storage

_ops = torch.ops.anee_fast
OPS = ("norm", "add_norm", "linear", "skip_kv", "skip_adapter", "paged_attention", "policy_step",
       "saturation_codes", "budget_controller")


def norm(x, weight, bias, eps: float, rms: bool):
    """RMSNorm (rms=True) or LayerNorm over the last dim, in float32; returns x's dtype."""
    return _ops.norm(x, weight, bias, float(eps), bool(rms))


def add_norm(x, residual, weight, bias, eps: float, rms: bool):
    """(x + residual, its RMSNorm / LayerNorm): the residual add and the norm in one op."""
    return _ops.add_norm(x, residual, weight, bias, float(eps), bool(rms))


def linear(x, weight, bias=None, activation: str = "none", residual=None, row_mask=None):
    """activation(x @ weight^T + bias), rows masked by row_mask, (+ residual); own GEMVs for the
    few rows of a decode step (on CUDA with the epilogue fused); weight: a float tensor or a
    QuantizedWeight (weight_formats.py), dequantized inside the kernel."""
    return _ops.linear(x, storage(weight), bias, activation, residual, row_mask, format_of(weight))


def skip_kv(h, norm_weight, norm_bias, kv_weight, kv_bias, positions, inv_freq: Optional[torch.Tensor],
            rope_scale: float, k_cache, v_cache, slot_mapping, eps: float, rms: bool,
            q_out: Optional[torch.Tensor] = None):
    """norm -> K|V(|Q) projection -> RoPE -> cache write (and q_out) for one layer (see
    reference_ops)."""
    _ops.skip_kv(h, norm_weight, norm_bias, storage(kv_weight), kv_bias, positions, inv_freq,
                 float(rope_scale), k_cache, v_cache, slot_mapping, float(eps), bool(rms), q_out,
                 format_of(kv_weight))


def skip_adapter(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask, eps: float,
                 rms: bool):
    """h + up(down(norm(h))) + up_bias on the row_mask rows, h bit for bit on the others (see
    reference_ops); on the CPU only the row_mask rows cost anything."""
    if format_of(down_weight) != format_of(up_weight):
        raise ValueError(f"skip_adapter: down_weight and up_weight must have one format, got "
                         f"{format_of(down_weight)} and {format_of(up_weight)}")
    return _ops.skip_adapter(h, norm_weight, norm_bias, storage(down_weight), storage(up_weight),
                             up_bias, row_mask, float(eps), bool(rms), format_of(down_weight))


def paged_attention(q, k_cache, v_cache, block_tables, seq_idx, positions, block_size: int,
                    scale: float, sliding_window: int = 0):
    """Causal attention of each query row over its own sequence's cached K/V."""
    return _ops.paged_attention(q, k_cache, v_cache, block_tables, seq_idx, positions,
                                int(block_size), float(scale), int(sliding_window or 0))


def policy_step(proposed, spent, stopped, allowed, limit, budget_left, actions, layer: int,
                commitment: float, skip_cost: float, stop_code: int, forced: bool):
    """One layer of the depth policy's budget rule for every token (see reference_ops)."""
    return _ops.policy_step(proposed, spent, stopped, allowed, limit, budget_left, actions,
                            int(layer), float(commitment), float(skip_cost), int(stop_code),
                            bool(forced))


def saturation_codes(h, h_prev, budget_left, skip_saturation: float, exit_saturation: float,
                     exit_threshold: float):
    """The saturation heuristic's proposals for every token (see reference_ops)."""
    return _ops.saturation_codes(h, h_prev, budget_left, float(skip_saturation),
                                 float(exit_saturation), float(exit_threshold))


def budget_controller(h, h_prev, budget, budget_left, scalar_mean, scalar_std, proj_weight,
                      inp_weight, inp_bias, layer_weight, hidden_weight, hidden_bias, out_weight,
                      out_bias, layer: int, num_layers: int, skip_cost: float,
                      order_position: int, order_length: int, margin: float,
                      net_min_budget: float, net_max_budget: float, exit_threshold: float):
    """The trained controller's proposals for every token at one layer (see reference_ops)."""
    return _ops.budget_controller(h, h_prev, budget, budget_left, scalar_mean, scalar_std,
                                  proj_weight, inp_weight, inp_bias, layer_weight, hidden_weight,
                                  hidden_bias, out_weight, out_bias, int(layer), int(num_layers),
                                  float(skip_cost), int(order_position), int(order_length),
                                  float(margin), float(net_min_budget), float(net_max_budget),
                                  float(exit_threshold))


# Fake (meta) implementations: shapes and dtypes only, for FakeTensor tracing / torch.compile.

@torch.library.register_fake("anee_fast::norm")
def _norm_fake(x, weight, bias, eps, rms):
    return x.new_empty(x.shape)


@torch.library.register_fake("anee_fast::add_norm")
def _add_norm_fake(x, residual, weight, bias, eps, rms):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("anee_fast::linear")
def _linear_fake(x, weight, bias, activation="none", residual=None, row_mask=None,
                 weight_format="dense"):
    out = weight.shape[0] // 2 if activation == "silu_gated" else weight.shape[0]
    return x.new_empty((*x.shape[:-1], out))


@torch.library.register_fake("anee_fast::skip_kv")
def _skip_kv_fake(h, norm_weight, norm_bias, kv_weight, kv_bias, positions, inv_freq, rope_scale,
                  k_cache, v_cache, slot_mapping, eps, rms, q_out=None, weight_format="dense"):
    return None


@torch.library.register_fake("anee_fast::skip_adapter")
def _skip_adapter_fake(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask, eps,
                       rms, weight_format="dense"):
    return h.new_empty(h.shape)


@torch.library.register_fake("anee_fast::paged_attention")
def _paged_attention_fake(q, k_cache, v_cache, block_tables, seq_idx, positions, block_size,
                          scale, sliding_window):
    return q.new_empty(q.shape)


@torch.library.register_fake("anee_fast::policy_step")
def _policy_step_fake(proposed, spent, stopped, allowed, limit, budget_left, actions, layer,
                      commitment, skip_cost, stop_code, forced):
    return stopped.new_empty(stopped.shape)


@torch.library.register_fake("anee_fast::saturation_codes")
def _saturation_codes_fake(h, h_prev, budget_left, skip_saturation, exit_saturation, exit_threshold):
    return h.new_empty(h.shape[:1], dtype=torch.int8)


@torch.library.register_fake("anee_fast::budget_controller")
def _budget_controller_fake(h, h_prev, budget, budget_left, scalar_mean, scalar_std, proj_weight,
                            inp_weight, inp_bias, layer_weight, hidden_weight, hidden_bias,
                            out_weight, out_bias, layer, num_layers, skip_cost, order_position,
                            order_length, margin, net_min_budget, net_max_budget,
                            exit_threshold):
    return h.new_empty(h.shape[:1], dtype=torch.int8)


def supports(device_type: str) -> bool:
    """Whether this build has kernels for tensors on `device_type` ("cpu", "cuda"). The CPU
    kernels are always built; CUDA ones only when torch had CUDA and nvcc at build time."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(str(device_type))
    return key is not None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"anee_fast::{op}", key)
        for op in OPS)
