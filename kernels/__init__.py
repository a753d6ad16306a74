"""Device code only, by device, installed as `fused_ops.kernels`:

    triton/   Triton kernels and their launchers (CUDA GPUs; CPU tensors through Triton's interpreter)
    cpu/      native C++ kernels, one .cpp per op, built on first use (the "native" backend)

Nothing here is imported by `import fused_ops`: each op imports its kernels when a call runs them.
"""
