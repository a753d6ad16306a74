"""The native CPU kernels: C++ sources, one `<op>.cpp` per op (the kernels, then their registration as
`torch.library` ops in the `fused_ops` namespace, with the autograd in C++), each beside an `<op>.py`
holding its ops' fake kernels and handles.

`build.load()` compiles every .cpp here into one library on first use (torch.utils.cpp_extension and
ninja; cached after) and loads it. Nothing here is imported by `import fused_ops`: the "native"
backend loads it when a call runs it (fused_ops/backend.py).

A new op is `<op>.cpp`: its kernels, then `TORCH_LIBRARY_FRAGMENT(fused_ops, m)`
with the op's schemas, its CPU kernels and, for the differentiable op, an Autograd kernel that records
a torch::autograd::Node (common.h: make_node; cross_entropy.cpp's CrossEntropyBackward and
batch_norm.cpp's BatchNormBackward are the models);
`<op>.py`: its fake kernels and op handles; and its name in fused_ops.backend.NATIVE_OPS. build.py
compiles and loads it with no change.
"""
