"""What is measured: the ops, their shapes, the providers that run them, and each op's byte model.

An op is measured at a `Case` (op, shape, dtype). A provider turns a case into a `Runner`: fresh
inputs plus a forward callable, from which `mode_fn` makes the timed callable of each mode:

    fwd      y = forward()                              (inputs require grad, as in training)
    bwd      y.backward(dy)                             after an untimed forward() that builds y's graph
    fwd+bwd  forward().backward(dy)
    step     one makemore training step: forward, loss, zero_grad, backward, SGD update

Byte models (`bytes_moved`) count the unavoidable traffic of the op, the same for every provider, so
GB/s compares providers on the same work.

The CNN cases (BatchNorm2d, BatchNorm2d + add + ReLU, a ResNet basic-block step) live in `bench.cnn`,
registered here: their shapes are `cnn.Shape`s, (N, C, H, W) in a layout.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fused_ops
from bench import cnn

OPS = ("ce", "bn", "bn_tanh", "makemore", *cnn.OPS)
OP_TITLES = {
    "ce": "cross-entropy",
    "bn": "BatchNorm (training)",
    "bn_tanh": "BatchNorm + tanh (training)",
    "makemore": "makemore MLP training step",
    **cnn.OP_TITLES,
}
MODES = ("fwd", "bwd", "fwd+bwd", "step")
OP_MODES = {
    "ce": ("fwd", "bwd", "fwd+bwd"),
    "bn": ("fwd", "bwd", "fwd+bwd"),
    "bn_tanh": ("fwd", "bwd", "fwd+bwd"),
    "makemore": ("step",),
    **cnn.OP_MODES,
}
# Provider order is also the sweep's priority order: under a time budget the last ones are dropped first.
PROVIDERS = ("fused", "eager", "unfused", "liger", "compile")
OP_PROVIDERS = {
    "ce": ("fused", "eager", "liger", "compile"),
    "bn": ("fused", "eager", "compile"),
    "bn_tanh": ("fused", "unfused", "eager", "compile"),  # unfused: fused_ops.batch_norm, then torch.tanh
    "makemore": ("fused", "eager", "compile"),
    **cnn.OP_PROVIDERS,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Issue 3 / issue 4 shape grids.
CE_SHAPES = tuple((n, c) for n in (32, 4096, 16384) for c in (27, 1024, 32000, 50257, 128256))
BN_SHAPES = ((32, 64), (32, 200), (4096, 1024), (65536, 256), (16384, 4096))


@dataclass(frozen=True)
class MakemoreSize:
    """One makemore MLP configuration: batch, context length, embedding and hidden widths."""

    name: str
    batch: int
    block_size: int
    n_embd: int
    n_hidden: int
    vocab_size: int = 27

    @property
    def label(self) -> str:
        return f"{self.name} B={self.batch} ctx={self.block_size} emb={self.n_embd} hid={self.n_hidden}"


MAKEMORE_SIZES = {
    # The backprop-ninja notebook: batch 32, 3 characters of context, 10-dim embedding, 64 hidden units.
    "notebook": MakemoreSize("notebook", batch=32, block_size=3, n_embd=10, n_hidden=64),
    # Scaled up so the step is no longer launch bound: BatchNorm at (4096, 1024), one of the BN shapes.
    "scaled": MakemoreSize("scaled", batch=4096, block_size=8, n_embd=64, n_hidden=1024),
}


@dataclass(frozen=True)
class Case:
    """One measured point: op, shape ((N, C), a makemore size name, or a `cnn.Shape`) and dtype name
    ("fp32"/"bf16")."""

    op: str
    shape: tuple[int, int] | str | cnn.Shape
    dtype: str

    @property
    def label(self) -> str:
        if self.op in cnn.OPS:
            return self.shape.label
        if self.op == "makemore":
            return MAKEMORE_SIZES[self.shape].label
        n, c = self.shape
        return f"{n}x{c}"

    @property
    def numel(self) -> int:
        """Elements of the op's main (N, C) tensor; for makemore, batch x hidden width (the plots' x axis)."""
        if self.op in cnn.OPS:
            return self.shape.numel
        if self.op == "makemore":
            size = MAKEMORE_SIZES[self.shape]
            return size.batch * size.n_hidden
        n, c = self.shape
        return n * c


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def bytes_moved(case: Case, mode: str) -> int | None:
    """Minimum bytes each call must move (the GB/s numerator); None where GB/s means nothing."""
    if case.op in cnn.OPS:
        return cnn.bytes_moved(case.op, case.shape, element_size(case.dtype), mode)
    if case.op == "makemore":
        return None  # a training step is matmul and launch bound; time is the metric
    n, c = case.shape
    b = element_size(case.dtype)
    if case.op == "ce":
        if mode == "fwd":
            return n * c * b + 8 * n  # fwd: read logits + int64 targets = N*C*b + 8*N
        if mode == "bwd":
            # bwd: read logits + write dlogits = 2*N*C*b (a backward that kept only the per-row logsumexp).
            # The fused forward already wrote dlogits, so its bwd is a scale: compare providers on fwd+bwd.
            return 2 * n * c * b + 8 * n
        return 2 * n * c * b + 8 * n  # fwd+bwd (2-pass): read logits + write dlogits = 2*N*C*b + 8*N
    # BatchNorm; per-feature statistics and parameters (C values each) are negligible.
    fwd = 2 * n * c * b  # fwd (2-pass): read x + write y = 2*N*C*b
    if case.op == "bn":
        bwd = 3 * n * c * b  # bwd (3-pass): read x + read dy + write dx = 3*N*C*b
    else:
        bwd = (
            4 * n * c * b
        )  # bwd with tanh: read x (for xhat) + saved y (for 1 - y^2) + dy, write dx = 4*N*C*b
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def byte_model(case: Case, mode: str) -> str:
    """The byte model a row states beside its GB/s where it depends on the shape (the CNN cases), or ""."""
    return cnn.byte_model(case.op, case.shape, element_size(case.dtype), mode) if case.op in cnn.OPS else ""


def memory_needed(case: Case) -> int:
    """A generous upper bound of the bytes one provider's run of this case holds at its peak.

    Cross-entropy in eager fwd+bwd holds the logits, log_softmax's output, nll_loss's gradient and
    dlogits (4 x N*C); BatchNorm + tanh in eager holds x, the normalised x, y, dy and dx. Counted at
    fp32 or wider (the PyTorch paths compute low-precision input in fp32), plus room for the
    allocator's slack and the compile and Liger workspaces.
    """
    if case.op in cnn.OPS:
        return cnn.memory_needed(case.op, case.shape, element_size(case.dtype))
    if case.op == "makemore":
        size = MAKEMORE_SIZES[case.shape]
        return 32 * size.batch * (size.n_hidden + size.block_size * size.n_embd) * 4
    n, c = case.shape
    copies = 6 if case.op == "ce" else 8
    return copies * n * c * max(element_size(case.dtype), 4)


class Unavailable(Exception):
    """The provider cannot run this case here (not installed, needs CUDA, ...): the row says why."""


@dataclass
class Runner:
    """A provider's callables for one case, on inputs built for it alone."""

    forward: Callable[[], torch.Tensor] | None = None
    grad_output: torch.Tensor | None = None
    step: Callable[[], None] | None = None
    grad_to_none: list[torch.Tensor] = field(default_factory=list)
    backend: str | None = None  # fused_ops backend to force around every call (see fused_backend)

    def reset(self) -> None:
        """Drop the gradients so that the next backward writes them instead of accumulating."""
        for t in self.grad_to_none:
            t.grad = None


@dataclass
class Timed:
    """What one timed repetition runs (`fn`), after an untimed `setup` when there is one."""

    fn: Callable[[], object]
    setup: Callable[[], None] | None = None


def mode_fn(runner: Runner, mode: str) -> Timed:
    """The callables that one timed repetition of `mode` runs."""
    if mode == "step":
        return Timed(runner.step)
    forward, dy = runner.forward, runner.grad_output
    if mode == "fwd":
        return Timed(forward)
    if mode == "fwd+bwd":
        return Timed(lambda: forward().backward(dy))
    # bwd: a fresh forward graph before each repetition, untimed; the backward alone is timed. (Not
    # retain_graph on one graph: a backward that hands over its saved gradient can run only once.)
    graph = {}

    def setup() -> None:
        graph["out"] = forward()

    def backward() -> None:
        graph.pop("out").backward(dy)

    return Timed(backward, setup)


def fused_backend(device: torch.device) -> str:
    """The fused provider's backend, forced, never a fallback: the Triton kernels on CUDA, the native
    kernels on CPU (cross-entropy and BatchNorm; linear cross-entropy's chunk step runs cross-entropy's)."""
    return "triton" if device.type == "cuda" else "native"


def _compiled(fn: Callable) -> Callable:
    """torch.compile of the eager code, from a clean Dynamo state.

    Resetting first keeps one case's compilation from counting against the next one's recompile
    limit (past it Dynamo silently falls back to eager) or turning its shapes dynamic.
    """
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _liger_cross_entropy(device: torch.device) -> Callable:
    if importlib.util.find_spec("liger_kernel") is None:
        raise Unavailable("not installed (pip install liger-kernel)")
    if device.type != "cuda":
        raise Unavailable("needs CUDA (Liger-Kernel runs Triton kernels only)")
    from liger_kernel.transformers.functional import liger_cross_entropy

    return liger_cross_entropy


def build(case: Case, provider: str, device: torch.device, seed: int = 0) -> Runner:
    """Fresh inputs for `case` and the callables of `provider`; raises Unavailable when it cannot run here."""
    if provider not in OP_PROVIDERS[case.op]:
        raise ValueError(f"provider {provider!r} does not apply to op {case.op!r}")
    # Inputs are drawn on the device: drawing 2^31 elements on the host and copying would take seconds.
    generator = torch.Generator(device=device).manual_seed(seed)
    if case.op == "ce":
        return _build_cross_entropy(case, provider, device, generator)
    if case.op == "makemore":
        return _build_makemore(case, provider, device, generator)
    if case.op in cnn.OPS:
        return cnn.build(
            case.op, case.shape, DTYPES[case.dtype], provider, device, generator, Runner, _compiled,
            fused_backend(device),
        )
    return _build_batch_norm(case, provider, device, generator)


def _randn(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _randint(high: int, shape, generator, device) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=generator, device=device)


def _build_cross_entropy(case: Case, provider: str, device: torch.device, generator) -> Runner:
    n, c = case.shape
    dtype = DTYPES[case.dtype]
    if provider == "liger":
        loss_fn = _liger_cross_entropy(device)
    elif provider == "compile":
        loss_fn = _compiled(F.cross_entropy)
    else:
        loss_fn = {"fused": fused_ops.cross_entropy, "eager": F.cross_entropy}[provider]
    logits = _randn((n, c), generator, device, dtype).requires_grad_()
    target = _randint(c, (n,), generator, device)
    # Liger writes dlogits into the logits buffer during its forward: harmless here, the inputs are its own.
    return Runner(
        forward=lambda: loss_fn(logits, target),
        grad_output=torch.ones((), device=device, dtype=torch.float32),  # loss.backward(): reduction="mean"
        grad_to_none=[logits],
        backend=fused_backend(device) if provider == "fused" else None,
    )


def _build_batch_norm(case: Case, provider: str, device: torch.device, generator) -> Runner:
    """Training-mode BatchNorm over (N, C): input in the case's dtype, fp32 parameters and running stats."""
    n, c = case.shape
    dtype = DTYPES[case.dtype]
    x = (_randn((n, c), generator, device, dtype) * 2 + 0.5).requires_grad_()
    weight = (1 + 0.1 * _randn((c,), generator, device)).requires_grad_()
    bias = (0.1 * _randn((c,), generator, device)).requires_grad_()
    running_mean = torch.zeros(c, device=device)
    running_var = torch.ones(c, device=device)
    activation = "tanh" if case.op == "bn_tanh" else None

    def eager(x, running_mean, running_var, weight, bias):
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training=True)
        return torch.tanh(y) if activation == "tanh" else y

    def fused(x, running_mean, running_var, weight, bias):
        return fused_ops.batch_norm(
            x, running_mean, running_var, weight, bias, training=True, activation=activation
        )

    def unfused(x, running_mean, running_var, weight, bias):
        return torch.tanh(fused_ops.batch_norm(x, running_mean, running_var, weight, bias, training=True))

    fn = (
        _compiled(eager)
        if provider == "compile"
        else {"fused": fused, "unfused": unfused, "eager": eager}[provider]
    )
    return Runner(
        forward=lambda: fn(x, running_mean, running_var, weight, bias),
        grad_output=_randn((n, c), generator, device, dtype),
        grad_to_none=[x, weight, bias],
        backend=fused_backend(device) if provider in ("fused", "unfused") else None,
    )


def _build_makemore(case: Case, provider: str, device: torch.device, generator) -> Runner:
    """One SGD step of `fused_ops.makemore.model.MLP` (fp32) on a random batch of character contexts."""
    from fused_ops.makemore.model import MLP

    size = MAKEMORE_SIZES[case.shape]
    if case.dtype != "fp32":
        raise Unavailable("the makemore step runs in fp32 only")
    model = MLP(
        size.vocab_size,
        size.block_size,
        size.n_embd,
        size.n_hidden,
        fused=provider == "fused",
        generator=torch.Generator().manual_seed(0),
    ).to(device)  # initialised on the CPU, then moved
    forward = _compiled(model) if provider == "compile" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = _randint(size.vocab_size, (size.batch, size.block_size), generator, device)
    targets = _randint(size.vocab_size, (size.batch,), generator, device)

    def step() -> None:
        _, loss = forward(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Runner(
        step=step,
        grad_to_none=list(model.parameters()),
        backend=fused_backend(device) if provider == "fused" else None,
    )
