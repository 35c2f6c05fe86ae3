"""linear for the "triton" backend: the reference's, i.e. cuBLAS for the product and torch's
ops for the epilogue (activation, residual add).

No Triton kernel on purpose: a GEMM/GEMV written here would have to beat cuBLAS on every shape
of the block. The native backend fuses the epilogue into its own decode GEMV instead.
"""
from anee_fast.reference_ops import linear

__all__ = ["linear"]
