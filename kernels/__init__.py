"""Triton kernels of pcr_fast (installed as ``pcr_fast.kernels``; Triton only, no autograd, no HF).

Each kernel file holds one ``@triton.jit`` kernel and a typed launcher that takes plain
tensors. The autograd Functions that use them live in :mod:`pcr_fast.triton_function`.
"""
