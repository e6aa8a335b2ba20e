"""Triton kernels for CUDA devices, imported lazily (only on a GPU or by tests)."""
