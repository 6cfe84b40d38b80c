"""Triton kernels of pcr_fast (installed as ``pcr_fast.kernels``; Triton only, no autograd, no HF).

One kernel family per file, each with a typed launcher that takes plain tensors:
``two_view_fwd`` (fused forward: online statistics of one or two views), ``two_view_grad``
(fused recompute of a logit block -> its gradient, stored for the GEMMs), ``grad_matmul``
(the dh and dW GEMMs of the fused backward), ``two_view_chunked`` (statistics and in-place
logit gradient of the cuBLAS-chunked mode), ``patch_gather`` (one-pass patch shuffle/mask).
``two_view_common`` holds their shared tile helpers, ``stats_table`` the torch side of the
kernel contract (states -> statistics -> gradient coefficients) and ``launch`` every launch
configuration and memory plan. The autograd Functions live in :mod:`pcr_fast.backends`.
"""
