"""The makemore application, built on fused_ops' public API only: the bundled names (`data`), the
seed notebook's MLP (`model`), the main job (`train`) and the gradient parity report (`parity`).

Run it with `python -m fused_ops train|parity`. The library never imports this package.
"""
