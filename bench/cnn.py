"""The CNN cases of issue 13: BatchNorm2d, BatchNorm2d + residual add + ReLU, a ResNet basic-block step.

A case's shape is a `Shape`: (N, C, H, W) of the BatchNorm input (of the block, for the step) and its
layout, "nchw" (contiguous) or "nhwc" (channels_last). Ops and providers:

    bn2d            training BatchNorm2d (fp32 weight, bias, running stats)
                    fused: fused_ops.batch_norm; eager: F.batch_norm (torch's native or cuDNN kernels);
                    compile: torch.compile of the eager code
    bn2d_add_relu   relu(bn(x) + residual), a ResNet block's bn2 -> += identity -> relu
                    fused: one fused_ops.batch_norm(residual=, activation="relu");
                    unfused: fused_ops.batch_norm, then + residual, then relu;
                    eager: the three torch ops (F.batch_norm, +, relu); compile: torch.compile of those
    resnet_block    one SGD step of a torchvision BasicBlock (C -> C, stride 1): conv-bn-relu-conv-bn-add-relu
                    fused: bn1 with relu, bn2 with the residual and relu (fused_ops.BatchNorm2d);
                    eager: torch's block; compile: torch.compile of torch's block

Byte models (E = N*C*H*W elements of b bytes; the (C,) vectors are negligible), the unavoidable DRAM
traffic of the op, the same for every provider. A training forward reads x for the statistics before
it can write y: where x fits in L2 the second read hits there (2 passes), where it does not it crosses
DRAM again (3 passes); likewise the backward reads x and dy (and y for relu) twice, for the sums and
for dx. `byte_model` names the model a row is measured against; `bytes_moved` counts it:
    bn2d           fwd: read x + write y = 2*E*b (3*E*b when x > L2)
                   bwd: read x, dy + write dx = 3*E*b (5*E*b when x + dy > L2)
    bn2d_add_relu  fwd: read x, residual + write y = 3*E*b (4*E*b when x > L2)
                   bwd: read x, y, dy + write dx, dresidual = 5*E*b (8*E*b when x + y + dy > L2)
    fwd+bwd        the sum of the two
    resnet_block   none (convolution bound: time is the metric)
Where the kernels keep a whole channel block on chip (small N*H*W) x is read once: the L2-resident
model holds whatever the L2 size. On CPU the models are the L2-resident ones.

`python -m bench.cnn [bn2d bn2d_add_relu resnet_block]` measures fused against eager side by side on the
CPU shapes (alternating rounds): the check of the CPU goal, fused no slower than 2x eager.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import fused_ops

OPS = ("bn2d", "bn2d_add_relu", "resnet_block")
OP_TITLES = {
    "bn2d": "BatchNorm2d (training)",
    "bn2d_add_relu": "BatchNorm2d + add + ReLU (training)",
    "resnet_block": "ResNet basic-block training step",
}
OP_MODES = {
    "bn2d": ("fwd", "bwd", "fwd+bwd"),
    "bn2d_add_relu": ("fwd", "bwd", "fwd+bwd"),
    "resnet_block": ("step",),
}
OP_PROVIDERS = {
    "bn2d": ("fused", "eager", "compile"),
    "bn2d_add_relu": ("fused", "unfused", "eager", "compile"),
    "resnet_block": ("fused", "eager", "compile"),
}


class Shape(NamedTuple):
    n: int
    c: int
    h: int
    w: int
    layout: str  # "nchw" | "nhwc"

    @property
    def label(self) -> str:
        return f"{self.n}x{self.c}x{self.h}x{self.w} {self.layout}"

    @property
    def numel(self) -> int:
        return self.n * self.c * self.h * self.w

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.layout == "nhwc" else torch.contiguous_format


def _both_layouts(*shapes: tuple[int, int, int, int]) -> tuple[Shape, ...]:
    return tuple(Shape(*s, layout) for s in shapes for layout in ("nchw", "nhwc"))


# ResNet-50's BatchNorm inputs at batch 256 (x > L2 on every current GPU: the 3-pass regime), and two at
# batch 32 whose x fits in a 50 MB L2 in bf16 (the 2-pass regime), so both sides of the line are measured.
RESNET50 = ((256, 64, 56, 56), (256, 256, 56, 56), (256, 512, 28, 28), (256, 2048, 7, 7))
SHAPES = {
    "full": {
        "bn2d": _both_layouts(*RESNET50, (32, 64, 56, 56), (32, 512, 28, 28)),
        "bn2d_add_relu": _both_layouts(*RESNET50, (32, 256, 56, 56)),
        "resnet_block": _both_layouts((64, 64, 56, 56), (64, 256, 14, 14)),
    },
    # CPU: the same channel counts and spatial sizes at small batches (0.8M-1.6M elements)
    "cpu": {
        "bn2d": _both_layouts((8, 64, 56, 56), (8, 256, 28, 28), (8, 512, 14, 14), (16, 2048, 7, 7)),
        "bn2d_add_relu": _both_layouts((8, 64, 56, 56), (8, 256, 28, 28), (16, 2048, 7, 7)),
        "resnet_block": _both_layouts((4, 64, 28, 28)),
    },
    "quick": {
        "bn2d": _both_layouts((4, 8, 6, 5)),
        "bn2d_add_relu": _both_layouts((4, 8, 6, 5)),
        "resnet_block": (Shape(2, 8, 6, 6, "nhwc"),),
    },
}
# torch.compile costs seconds per case on a GPU, tens of seconds on a CPU: by default it runs on these.
COMPILE_DEFAULT = {
    "cuda": {
        "bn2d": _both_layouts((256, 256, 56, 56), (256, 2048, 7, 7)),
        "bn2d_add_relu": _both_layouts((256, 256, 56, 56)),
        "resnet_block": _both_layouts((64, 64, 56, 56)),
    },
    "cpu": {
        "bn2d": _both_layouts((8, 256, 28, 28)),
        "bn2d_add_relu": _both_layouts((8, 256, 28, 28)),
        "resnet_block": (),
    },
}


def parse_token(token: str) -> Shape | None:
    """"NxCxHxW" (both layouts are then measured) -> its NCHW Shape; None for any other token."""
    parts = token.lower().split("x")
    if len(parts) != 4:
        return None
    n, c, h, w = (int(p) for p in parts)
    if n < 1 or c < 1 or h < 1 or w < 1 or n * h * w < 2:
        raise ValueError(f"--shapes: {token!r} needs N*H*W >= 2 (BatchNorm training) and every size >= 1")
    return Shape(n, c, h, w, "nchw")


# ----------------------------------------------------------------------------------------------------
# Byte models
# ----------------------------------------------------------------------------------------------------
_L2_BYTES: dict[str, int | None] = {}  # device type -> L2 size, recorded by `build`


def _l2_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)


def _reread_fits(op: str, numel: int, b: int, mode: str, l2: int | None) -> bool:
    """Whether the tensors a split-regime pass reads twice fit in L2 (None: no L2 to miss, the CPU's)."""
    if l2 is None:
        return True
    reread = {"fwd": 1, "bwd": 2 if op == "bn2d" else 3}[mode]  # x; x and dy (and y for relu)
    return reread * numel * b <= l2


def _on_chip(shape: Shape) -> bool:
    """The Triton kernels' on-chip regime (x read once) at this shape, as their launch settings decide."""
    from fused_ops.kernels.triton import batch_norm as kernels

    if shape.layout == "nhwc":
        flat = (shape.n * shape.h * shape.w, shape.c, 1)
    else:
        flat = (shape.n, shape.c, shape.h * shape.w)
    return kernels.launch_settings(*flat).on_chip


def _passes(op: str, shape: Shape, b: int, mode: str) -> tuple[int, bool]:
    """(passes over E*b bytes, L2-resident model) of one direction."""
    resident = {"fwd": 2 if op == "bn2d" else 3, "bwd": 3 if op == "bn2d" else 5}[mode]
    extra = {"fwd": 1, "bwd": 2 if op == "bn2d" else 3}[mode]
    l2 = _L2_BYTES.get("cuda")
    fits = l2 is None or _kernels_on_chip(shape) or _reread_fits(op, shape.numel, b, mode, l2)
    return (resident, True) if fits else (resident + extra, False)


def _kernels_on_chip(shape: Shape) -> bool:
    try:
        return _on_chip(shape)
    except ImportError:  # no triton: the fused provider is the PyTorch path
        return False


def bytes_moved(op: str, shape: Shape, b: int, mode: str) -> int | None:
    if op == "resnet_block":
        return None
    modes = ("fwd", "bwd") if mode == "fwd+bwd" else (mode,)
    return sum(_passes(op, shape, b, m)[0] for m in modes) * shape.numel * b


def byte_model(op: str, shape: Shape, b: int, mode: str) -> str:
    """The byte model a row is measured against, e.g. "fwd 3-pass (x > L2)"."""
    if op == "resnet_block":
        return ""
    parts = []
    for m in ("fwd", "bwd") if mode == "fwd+bwd" else (mode,):
        passes, resident = _passes(op, shape, b, m)
        parts.append(f"{m} {passes}-pass ({'L2-resident' if resident else 'x > L2'})")
    return "byte model: " + ", ".join(parts)


def memory_needed(op: str, shape: Shape, b: int) -> int:
    """Generous: x, residual, y, dy, dx, dresidual and eager's saved tensors, at fp32 or wider; the block
    step holds about 12 activations of the input's size."""
    copies = 12 if op == "resnet_block" else 8
    return copies * shape.numel * max(b, 4)


# ----------------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's BasicBlock (C -> C, stride 1); fused when its BatchNorms are fused_ops', bn1 with the
    relu and bn2 with the residual add and the relu (README, "convert")."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.bn2, "activation", None) == "relu":
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), residual=x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def fused_block(block: BasicBlock) -> BasicBlock:
    """fused_ops.convert of a copy, with bn1's relu and bn2's residual add and relu fused in."""
    fused = fused_ops.convert(copy.deepcopy(block))
    fused.bn1.activation = fused.bn2.activation = "relu"
    return fused


def build(
    op: str,
    shape: Shape,
    dtype: torch.dtype,
    provider: str,
    device: torch.device,
    generator: torch.Generator,
    runner_cls: type,
    compiled: Callable,
    fused_backend: str,
):
    """The runner of one (op, shape, dtype, provider) case: see `bench.ops.build`, which passes its
    Runner class, its torch.compile wrapper and the fused provider's backend."""
    _L2_BYTES[device.type] = _l2_bytes(device)
    if op == "resnet_block":
        return _build_block(shape, dtype, provider, device, generator, runner_cls, compiled, fused_backend)
    size = (shape.n, shape.c, shape.h, shape.w)
    fmt = shape.memory_format

    def randn(*dims, scale=1.0, offset=0.0):
        t = torch.randn(dims, generator=generator, device=device) * scale + offset
        return t.to(dtype).contiguous(memory_format=fmt) if len(dims) == 4 else t

    x = randn(*size, scale=2.0, offset=0.5).requires_grad_()
    residual = randn(*size).requires_grad_() if op == "bn2d_add_relu" else None
    weight = randn(shape.c, scale=0.1, offset=1.0).requires_grad_()
    bias = randn(shape.c, scale=0.1).requires_grad_()
    running_mean, running_var = torch.zeros(shape.c, device=device), torch.ones(shape.c, device=device)
    stats = (running_mean, running_var)

    def eager():
        y = F.batch_norm(x, *stats, weight, bias, training=True)
        return y if residual is None else torch.relu(y + residual)

    def fused():
        activation = None if residual is None else "relu"
        return fused_ops.batch_norm(x, *stats, weight, bias, True, activation=activation, residual=residual)

    def unfused():
        return torch.relu(fused_ops.batch_norm(x, *stats, weight, bias, True) + residual)

    providers = {"fused": fused, "unfused": unfused, "eager": eager}
    fn = compiled(eager) if provider == "compile" else providers[provider]
    return runner_cls(
        forward=fn,
        grad_output=randn(*size),
        grad_to_none=[t for t in (x, residual, weight, bias) if t is not None],
        backend=fused_backend if provider in ("fused", "unfused") else None,
    )


def _build_block(shape, dtype, provider, device, generator, runner_cls, compiled, fused_backend):
    torch.manual_seed(0)
    block = BasicBlock(shape.c).to(device=device, dtype=dtype, memory_format=shape.memory_format)
    model = fused_block(block) if provider == "fused" else block
    forward = compiled(model) if provider == "compile" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn((shape.n, shape.c, shape.h, shape.w), generator=generator, device=device)
    x = x.to(dtype).contiguous(memory_format=shape.memory_format)
    target = torch.randn(x.shape, generator=generator, device=device).to(dtype)

    def step() -> None:
        loss = F.mse_loss(forward(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return runner_cls(
        step=step,
        grad_to_none=list(model.parameters()),
        backend=fused_backend if provider == "fused" else None,
    )


# ----------------------------------------------------------------------------------------------------
# Targets (issue 13), for bench.report
# ----------------------------------------------------------------------------------------------------
def target_lines(rows, speedups, pct_range, verdict_faster, verdict_pct) -> list[str]:
    """Issue 13's goals, each with what the run measured. The helpers are bench.report's."""
    ok = [r for r in rows if r.op in OPS and r.status == "ok"]
    if not ok:
        return []
    shapes = {r.shape for r in ok if r.op == "bn2d"}
    nhwc = {s for s in shapes if s.endswith("nhwc")}
    nhwc_bf16 = speedups(rows, "bn2d", "fwd+bwd", "bf16", "eager", shapes=nhwc)
    lines = [
        "BatchNorm2d fwd >= 90% of copy bandwidth (each row's byte model: see its note): "
        + verdict_pct(pct_range(rows, "bn2d", "fwd", shapes), 90),
        "BatchNorm2d bwd >= 85% of copy bandwidth: "
        + verdict_pct(pct_range(rows, "bn2d", "bwd", shapes), 85),
        "BatchNorm2d fwd+bwd >= 1.5x eager, bf16 channels_last: " + verdict_faster(nhwc_bf16, 1.5),
        "BatchNorm2d fwd+bwd against eager, every shape: "
        + verdict_faster(speedups(rows, "bn2d", "fwd+bwd", None, "eager"), 1.0),
        "BatchNorm2d + add + ReLU fwd+bwd >= 1.3x the three unfused torch ops: "
        + verdict_faster(speedups(rows, "bn2d_add_relu", "fwd+bwd", None, "eager"), 1.3),
        "ResNet basic-block step against torch's block: "
        + verdict_faster(speedups(rows, "resnet_block", "step", None, "eager"), 1.0),
    ]
    l2 = _L2_BYTES.get("cuda")
    if l2:
        fits = {b: l2 // b for b in (4, 2)}
        lines.append(
            f"2-pass / 3-pass line on this card (L2 = {l2 / 2**20:.0f} MiB): the forward's second read of x "
            f"hits L2 up to N*C*H*W = {fits[4] / 1e6:.1f}M (fp32) / {fits[2] / 1e6:.1f}M (bf16) elements; "
            f"the backward's (x and dy) up to half of that"
        )
    return lines


# ----------------------------------------------------------------------------------------------------
# Side by side on CPU: `python -m bench.cnn`
# ----------------------------------------------------------------------------------------------------
def side_by_side(rounds: int = 5, reps: int = 7, ops: tuple[str, ...] = OPS) -> list[str]:
    """fused against eager on the CPU preset's shapes, fwd+bwd (the block: its step), the two providers'
    measurements alternating over `rounds` rounds; each provider's time is its best round's median.

    On a shared machine a sweep measures every fused row before every eager one, so a load that comes
    and goes skews its ratios; alternating rounds and the best of them do not. Returns markdown rows.
    """
    from bench import ops as bench_ops
    from bench.timing import measure

    device = torch.device("cpu")
    lines = ["| op | dtype | shape | fused | eager | fused / eager |", "|---|---|---|---|---|---|"]
    for op in ops:
        mode = OP_MODES[op][-1]  # fwd+bwd, or step
        for dtype in ("fp32", "bf16"):
            for shape in SHAPES["cpu"][op]:
                case = bench_ops.Case(op, shape, dtype)
                runners = {p: bench_ops.build(case, p, device) for p in ("fused", "eager")}
                best = {p: float("inf") for p in runners}
                for _ in range(rounds):
                    for provider, runner in runners.items():
                        with fused_ops.use_backend(runner.backend or "auto"):
                            timed = bench_ops.mode_fn(runner, mode)
                            timing = measure(timed, device, reps, runner.grad_to_none)
                            best[provider] = min(best[provider], timing.median_ms)
                ratio = best["fused"] / best["eager"]
                lines.append(
                    f"| {OP_TITLES[op]}, {mode} | {dtype} | {shape.label} | {best['fused']:.2f} ms | "
                    f"{best['eager']:.2f} ms | {ratio:.2f} |"
                )
                print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    torch.set_num_threads(1)  # as `python -m bench --device cpu`
    side_by_side(ops=tuple(a for a in sys.argv[1:] if a in OPS) or OPS)
