"""Triton kernels of anee_fast (installed as `anee_fast.kernels`); filled by the kernels issue."""
