"""The native CPU kernels: C++ sources, one `<op>.cpp` per op (the kernels, then their registration as
`torch.library` ops in the `fused_ops` namespace, with the autograd in C++), each beside an `<op>.py`
holding its ops' fake kernels and handles.

`build.load()` compiles every .cpp here into one library on first use (torch.utils.cpp_extension and
ninja; cached after) and loads it. Nothing here is imported by `import fused_ops`: the "native"
backend loads it when a call runs it (fused_ops/backend.py).
"""
