"""Device code only: Triton kernels and their launchers, installed as `fused_ops.kernels`.

Importing a module here imports triton; the op files in `fused_ops/` import them lazily, only when
the Triton backend is chosen.
"""
