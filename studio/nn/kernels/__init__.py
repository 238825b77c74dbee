"""Triton kernels (CUDA builds of torch ship Triton; elsewhere `triton` is None and callers keep torch paths)."""
