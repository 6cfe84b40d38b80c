"""Triton kernels of pcr_fast (installed as ``pcr_fast.kernels``; Triton only, no autograd, no HF).

One kernel family per file, each with a typed launcher that takes plain tensors:
``two_view_fwd`` (fused forward), ``two_view_bwd`` (fused recompute backward),
``two_view_chunked`` (statistics and in-place logit gradient of the cuBLAS-chunked mode),
``patch_gather`` (one-pass patch shuffle/mask); ``two_view_common`` holds their shared tile
helpers and ``launch`` every launch configuration. The autograd Functions that use them
live in :mod:`pcr_fast.backends.triton`.
"""
