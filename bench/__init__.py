"""Microbenchmarks of fused_ops against torch eager, torch.compile and Liger-Kernel.

Run from the repository root: `python -m bench --help`. Modules, in the order a sweep uses them:
ops (cases, providers, byte models), sweep (plan and run), timing, memory, launches, environment,
report (table, CSV, plots, RESULTS.md).
"""
