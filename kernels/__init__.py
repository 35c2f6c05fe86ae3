"""Triton kernels of anee_fast (installed as `anee_fast.kernels`): the op set of the "triton"
backend, one file per op, each with the signature of anee_fast/ops/reference.py.

Set TRITON_INTERPRET=1 before importing to run them on the CPU (tests do, when there is no GPU).
"""
from .add_norm import add_norm
from .linear import linear
from .norm import norm
from .paged_attention import paged_attention
from .policy_step import policy_step
from .saturation_codes import saturation_codes
from .skip_kv import skip_kv

__all__ = ["norm", "add_norm", "linear", "skip_kv", "paged_attention", "policy_step", "saturation_codes"]
