"""The Triton kernels and their launchers, one module per op: `cross_entropy`, `batch_norm`.

Importing a module here imports triton; the op files in `fused_ops/` import them lazily, only when
the Triton backend runs a call. `spec.KernelSpec` lists each module's compilable specialisations.
"""
