"""The Triton BatchNorm kernels against the PyTorch path and F.batch_norm.

Without CUDA the kernels run through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by
conftest; marker `interpreter`), so shapes stay small. On a CUDA machine the same tests run the
compiled kernels on the GPU, and the `gpu` tests add large shapes, launch counts, CUDA graphs and
the no-host-sync check.

Every output the launchers allocate is poisoned with NaN first, so an element a kernel fails to
write shows up. The split-N regime is forced on small inputs with the launchers' `max_tile`.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_ops
from fused_ops import use_backend
from fused_ops.backend import BackendUnavailableError, triton_available, triton_interpreter_enabled
from fused_ops.batch_norm import _flatten, _layout, backward_torch, forward_torch

if not triton_available():  # only a missing triton skips the file: a kernel module that fails to import fails it
    pytest.skip("triton is not installed", allow_module_level=True)
from fused_ops.kernels.triton import batch_norm as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreter_enabled()),
    reason="needs CUDA or TRITON_INTERPRET=1 (set before triton is imported)",
)
F32 = {"atol": 2e-5, "rtol": 1e-4}
ACTIVATIONS = {None: lambda t: t, "relu": torch.relu, "tanh": torch.tanh, "silu": F.silu}


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty returns NaN-filled float tensors: any element a kernel does not write shows up."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)


@pytest.fixture
def small_combine_blocks(monkeypatch):
    """Combine kernels merge 2 splits per block, so a few splits already take several blocks."""
    monkeypatch.setattr(K, "COMBINE_BLOCK_S", 2)


@pytest.fixture
def few_splits(monkeypatch):
    """Partial programs aim at 8 in all (GPUs: SPLIT_PROGRAMS), so small inputs get several rows per split."""
    monkeypatch.setattr(K, "SPLIT_PROGRAMS", 8)


@pytest.fixture
def split_regime(monkeypatch, small_combine_blocks, few_splits):
    """Force the split-N regime end to end (module and Function) on small inputs."""
    monkeypatch.setattr(K, "MAX_TILE", 32)


def make_case(shape, dtype=torch.float32, affine=True, running=True, mean=3.0, std=2.0):
    """Fresh random x (N, C[, L]), weight/bias, running stats and upstream gradient, on DEVICE."""
    c = shape[1]
    gen = {"device": DEVICE}
    return {
        "x": (torch.randn(shape, **gen) * std + mean).to(dtype),
        "weight": torch.rand(c, **gen) + 0.5 if affine else None,
        "bias": torch.randn(c, **gen) if affine else None,
        "running_mean": torch.randn(c, **gen) if running else None,
        "running_var": torch.rand(c, **gen) + 0.5 if running else None,
        "dy": torch.randn(shape, **gen).to(dtype),
    }


def run(case, backend, training, momentum=0.1, unbiased=False, activation=None, functional=False):
    """Forward + backward on copies of `case` (a "residual" entry, if any, is added before the
    activation); returns outputs, grads and the updated running stats."""
    keys = ("x", "weight", "bias", "residual")
    leaf = {k: None if case.get(k) is None else _copy_leaf(case[k]) for k in keys}
    rm = None if case["running_mean"] is None else case["running_mean"].clone()
    rv = None if case["running_var"] is None else case["running_var"].clone()
    with use_backend(backend):
        if functional:  # torch's own ops: batch_norm, + residual, the activation
            y = F.batch_norm(leaf["x"], rm, rv, leaf["weight"], leaf["bias"], training, momentum)
            y = ACTIVATIONS[activation](y if leaf["residual"] is None else y + leaf["residual"])
        else:
            y = fused_ops.batch_norm(
                leaf["x"],
                rm,
                rv,
                leaf["weight"],
                leaf["bias"],
                training,
                momentum,
                unbiased=unbiased,
                activation=activation,
                residual=leaf["residual"],
            )
        y.backward(case["dy"])
    grads = {f"d{k}": None if v is None else v.grad for k, v in leaf.items()}
    return dict(y=y.detach(), **grads, running_mean=rm, running_var=rv)


def _in_format(case: dict, fmt: torch.memory_format) -> dict:
    """The case with its N-D tensors in memory format `fmt` ((C,) tensors and None as they are)."""
    return {k: v if v is None or v.ndim == 1 else v.contiguous(memory_format=fmt) for k, v in case.items()}


def _copy_leaf(t: torch.Tensor) -> torch.Tensor:
    """A leaf with t's values and strides (clone keeps a dense layout such as channels_last)."""
    return t.detach().clone().requires_grad_()


def assert_all_close(got, expected, **tol):
    for k, v in expected.items():
        if v is None:
            assert got[k] is None, k
        else:
            assert not got[k].isnan().any(), f"{k}: NaN (unwritten output?)"
            torch.testing.assert_close(got[k], v, **tol, msg=lambda m, k=k: f"{k}: {m}")


# Shapes: (32, 27) makemore's batch with an odd C (one on-chip launch); (2, 5) the smallest batch;
# (5, 3, 7) an (N, C, L) input reduced over N and L.
SHAPES = [(32, 27), (2, 5), (5, 3, 7)]
MODES = {  # name: (training, running stats given, unbiased)
    "train": (True, True, False),
    "train_unbiased": (True, True, True),
    "train_no_running": (True, False, False),
    "eval": (False, True, False),
}


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.usefixtures("poisoned")
class TestKernels:
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize("mode", list(MODES))
    @pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
    @pytest.mark.parametrize("activation", list(ACTIVATIONS))
    def test_option_grid(self, shape, mode, affine, activation):
        training, running, unbiased = MODES[mode]
        case = make_case(shape, affine=affine, running=running)
        ours = run(case, "triton", training, unbiased=unbiased, activation=activation)
        assert_all_close(ours, run(case, "torch", training, unbiased=unbiased, activation=activation), **F32)
        if not unbiased:
            assert_all_close(
                ours, run(case, "torch", training, activation=activation, functional=True), **F32
            )

    @pytest.mark.parametrize("shape,max_tile", [((40, 6), 32), ((10, 3, 13), 64)], ids=["2d", "3d"])
    @pytest.mark.parametrize("mode", ["train", "train_unbiased", "eval"])
    @pytest.mark.parametrize("activation", [None, "tanh", "silu"])
    @pytest.mark.usefixtures("small_combine_blocks")
    def test_split_regime_launchers(self, shape, max_tile, mode, activation, monkeypatch):
        """The partial / combine / apply kernels (several splits, a ragged last one) vs the PyTorch path,
        with a residual and its gradient."""
        training, _, unbiased = MODES[mode]
        monkeypatch.setattr(K, "SPLIT_PROGRAMS", 4)
        n, c = shape[:2]
        settings = K.launch_settings(n, c, shape[2] if len(shape) == 3 else 1, max_tile)
        assert not settings.on_chip and settings.num_splits >= 3 and n % settings.rows_per_split
        assert settings.rows_per_split > settings.tile.block_n  # several tiles per partial program
        case = make_case(shape)
        args = (case["weight"], case["bias"])
        stats = {k: (case["running_mean"].clone(), case["running_var"].clone()) for k in ("ours", "ref")}
        residual = torch.randn(shape, device=DEVICE)
        options = {"training": training, "unbiased": unbiased, "activation": activation}
        momentum = torch.tensor(0.3, device=DEVICE)
        forward = {"momentum": momentum, "eps": 1e-5, **options}
        y, mean, invstd = K.batch_norm_forward(
            case["x"], *args, *stats["ours"], residual, **forward, max_tile=max_tile
        )
        y_ref, mean_ref, invstd_ref = forward_torch(case["x"], *args, *stats["ref"], residual, **forward)
        saved = residual if activation == "silu" else None
        backward = {**options, "residual_grad": True}
        dx, dw, db, dres = K.batch_norm_backward(
            case["dy"], case["x"], y, saved, *args, mean, invstd, **backward, max_tile=max_tile
        )
        dx_ref, dw_ref, db_ref, dres_ref = backward_torch(
            case["dy"], case["x"], y_ref, saved, *args, mean_ref, invstd_ref, **backward
        )
        got = {
            "y": y,
            "mean": mean,
            "invstd": invstd,
            "dx": dx,
            "dw": dw,
            "db": db,
            "dres": dres,
            "rm": stats["ours"][0],
            "rv": stats["ours"][1],
        }
        exp = {
            "y": y_ref,
            "mean": mean_ref,
            "invstd": invstd_ref,
            "dx": dx_ref,
            "dw": dw_ref,
            "db": db_ref,
            "dres": dres_ref,
            "rm": stats["ref"][0],
            "rv": stats["ref"][1],
        }
        assert_all_close(got, exp, **F32)

    @pytest.mark.parametrize("regime", ["on_chip", "split"])
    @pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
    def test_module_steps_then_eval(self, regime, momentum, request):
        """Running stats over several steps, num_batches_tracked, then the eval forward and backward."""
        if regime == "split":
            request.getfixturevalue("split_regime")
        ours = fused_ops.BatchNorm1d(5, momentum=momentum, device=DEVICE)
        ref = nn.BatchNorm1d(5, momentum=momentum, device=DEVICE)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5), ref.bias.normal_()
        ours.load_state_dict(ref.state_dict())
        for step, train in enumerate((True, True, False, True, False)):
            ours.train(train), ref.train(train)
            x = torch.randn(24, 5, device=DEVICE) * (step + 1) + step
            dy = torch.randn(24, 5, device=DEVICE)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            with use_backend("triton"):
                y1 = ours(x1)
                y1.backward(dy)
            y2 = ref(x2)
            y2.backward(dy)
            torch.testing.assert_close(y1, y2, **F32)
            torch.testing.assert_close(x1.grad, x2.grad, **F32)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **F32)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **F32)
        for (name, got), exp in zip(ours.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(got, exp, **F32, msg=name)
        assert ours.num_batches_tracked.item() == 3

    @pytest.mark.parametrize("given", ["weight", "bias"])
    @pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
    def test_weight_or_bias_alone(self, given, training):
        case = make_case((12, 5))
        case["bias" if given == "weight" else "weight"] = None
        ours = run(case, "triton", training, activation="relu")
        assert_all_close(ours, run(case, "torch", training, activation="relu", functional=True), **F32)

    def test_no_tracking_eval_uses_batch_stats(self):
        ours = fused_ops.BatchNorm1d(6, track_running_stats=False, affine=False, device=DEVICE).eval()
        ref = nn.BatchNorm1d(6, track_running_stats=False, affine=False, device=DEVICE).eval()
        x = torch.randn(10, 6, 3, device=DEVICE) * 2
        with use_backend("triton"):
            torch.testing.assert_close(ours(x), ref(x), **F32)

    @pytest.mark.parametrize("layout", ["transposed", "sliced", "permuted_3d"])
    def test_non_contiguous(self, layout):
        if layout == "transposed":
            x = (torch.randn(27, 16, device=DEVICE) * 2 + 1).T
        elif layout == "sliced":
            x = (torch.randn(20, 30, device=DEVICE) * 2 + 1)[::2, 3:20]
        else:  # (N, L, C) storage viewed as (N, C, L): C is the unit-stride axis
            x = (torch.randn(6, 7, 5, device=DEVICE) * 2 + 1).permute(0, 2, 1)
        assert not x.is_contiguous()
        case = {**make_case(tuple(x.shape)), "x": x}
        case["dy"] = torch.randn(tuple(reversed(x.shape)), device=DEVICE).permute(*reversed(range(x.ndim)))
        for training in (True, False):
            expected = run(case, "torch", training, activation="tanh")
            assert_all_close(run(case, "triton", training, activation="tanh"), expected, **F32)

    @pytest.mark.parametrize("regime", ["on_chip", "split"])
    def test_constant_columns(self, regime, request):
        """var = 0: invstd = 1/sqrt(eps), xhat = 0, finite gradients, as torch."""
        if regime == "split":
            request.getfixturevalue("split_regime")
        case = make_case((24, 6))
        case["x"][:, 1] = 4.0
        case["x"][:, 4] = -1.5
        ours = run(case, "triton", True)
        assert_all_close(ours, run(case, "torch", True, functional=True), **F32)
        assert torch.isfinite(ours["dx"]).all()

    @pytest.mark.parametrize("regime", ["on_chip", "split"])
    def test_accurate_when_mean_dwarfs_std(self, regime, request):
        """|mean| = 1e4 * std: shifted sums keep the error below twice torch's own fp32 error."""
        if regime == "split":
            request.getfixturevalue("split_regime")
        case = make_case((40, 8), mean=1e4, std=1.0, running=False)
        exact = run(
            {k: None if v is None else v.double() for k, v in case.items()}, "torch", True, functional=True
        )
        torch_fp32 = run(case, "torch", True, functional=True)
        ours = run(case, "triton", True)
        for k in ("y", "dx", "dweight", "dbias"):
            err_ours = (ours[k].double() - exact[k]).abs().max().item()
            err_torch = (torch_fp32[k].double() - exact[k]).abs().max().item()
            assert err_ours <= 2 * err_torch + 1e-5, (k, err_ours, err_torch)

    @pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=str)
    @pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
    @pytest.mark.parametrize("activation", [None, "tanh"])
    def test_low_precision(self, dtype, atol, training, activation):
        """fp16/bf16 x with fp32 params and stats: error vs an fp32 reference <= 2 * torch's own + atol."""
        case = make_case((32, 20), dtype=dtype)
        exact = run(
            {k: None if v is None else v.float() for k, v in case.items()},
            "torch",
            training,
            activation=activation,
            functional=True,
        )
        ours = run(case, "triton", training, activation=activation)
        low = {k: v if v is None or k in ("x", "dy") else v.to(dtype) for k, v in case.items()}
        theirs = run(low, "torch", training, activation=activation, functional=True)  # torch, all in dtype
        assert ours["y"].dtype == ours["dx"].dtype == dtype and ours["dweight"].dtype == torch.float32
        for k in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
            if exact[k] is None:
                continue
            scale = exact[k].abs().max().item() + 1
            err_ours = (ours[k].float() - exact[k]).abs().max().item()
            err_torch = (theirs[k].float() - exact[k]).abs().max().item()
            assert err_ours <= 2 * err_torch + atol * scale, (k, err_ours, err_torch)

    def test_low_precision_params_and_running_stats(self):
        """bf16 weight, bias and running stats: converted for the kernel, running stats written back."""
        case = make_case((16, 6), dtype=torch.bfloat16)
        low = {k: v if v is None else v.to(torch.bfloat16) for k, v in case.items()}
        ours, ref = run(low, "triton", True), run(low, "torch", True)
        assert ours["dweight"].dtype == ours["running_mean"].dtype == torch.bfloat16
        assert_all_close(ours, ref, atol=2e-2, rtol=2e-2)

    def test_deterministic_split(self, split_regime):
        case = make_case((24, 7), running=True)
        first, second = (
            run(case, "triton", True, activation="tanh"),
            run(case, "triton", True, activation="tanh"),
        )
        for k, v in first.items():
            assert (v is None and second[k] is None) or torch.equal(v, second[k]), k

    def test_empty_batch(self):
        for shape in ((0, 4), (3, 4, 0)):
            case = make_case(shape)
            assert_all_close(run(case, "triton", True), run(case, "torch", True, functional=True))

    def test_float64_forced_triton_raises(self):
        x = torch.randn(4, 3, dtype=torch.float64, device=DEVICE)
        with use_backend("triton"), pytest.raises(BackendUnavailableError, match="float64"):
            fused_ops.batch_norm(x, None, None, training=True)

    def test_makemore_shape_is_one_launch_each_way(self, monkeypatch):
        launches = []

        def counting(kernel):
            class Counted:
                def __getitem__(self, grid):
                    launches.append((kernel.fn.__name__, grid))
                    return kernel[grid]

            return Counted()

        for name in dir(K):
            if name.startswith("batch_norm_") and name.endswith("_kernel"):
                monkeypatch.setattr(K, name, counting(getattr(K, name)))
        m = fused_ops.BatchNorm1d(200, activation="tanh", device=DEVICE)
        x = torch.randn(32, 200, device=DEVICE, requires_grad=True)
        with use_backend("triton"):
            y = m(x)
            assert [name for name, _ in launches] == ["batch_norm_fwd_kernel"]
            y.backward(torch.randn_like(y))
        assert [name for name, _ in launches] == ["batch_norm_fwd_kernel", "batch_norm_bwd_kernel"]


# Shapes as the op flattens them: NCHW -> (N, C, L) with L = H * W; channels_last and channels_last_3d
# -> (M, C) rows. C = 5 is odd; both fit on chip by default and take the split regime with `split_regime`.
LAYOUT_SHAPES = {
    "nchw": ((3, 5, 4, 6), torch.contiguous_format),
    "channels_last": ((3, 5, 4, 6), torch.channels_last),
    "channels_last_3d": ((2, 5, 2, 3, 2), torch.channels_last_3d),
}


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.usefixtures("poisoned")
class TestLayouts:
    """4-D and 5-D input in both layouts and both regimes, every activation, with the residual: the
    kernels against the PyTorch path and torch's unfused ops, in training and eval; memory format kept."""

    @pytest.mark.parametrize("layout", list(LAYOUT_SHAPES))
    @pytest.mark.parametrize("regime", ["on_chip", "split"])
    @pytest.mark.parametrize("activation", list(ACTIVATIONS))
    def test_residual_and_activation(self, layout, regime, activation, request):
        if regime == "split":
            request.getfixturevalue("split_regime")
        shape, fmt = LAYOUT_SHAPES[layout]
        case = _in_format(make_case(shape), fmt)
        case["residual"] = torch.randn(shape, device=DEVICE).contiguous(memory_format=fmt)
        flat = _flatten(case["x"], _layout(case["x"]))  # what the kernels get: (N, C, L) or (M, C) rows
        assert (flat.ndim == 2) == (fmt != torch.contiguous_format)
        n, c, length = (*flat.shape, 1)[:3]
        assert K.launch_settings(n, c, length, K.MAX_TILE).on_chip == (regime == "on_chip")
        for training in (True, False):
            ours = run(case, "triton", training, activation=activation)
            assert ours["y"].is_contiguous(memory_format=fmt) and ours["dx"].is_contiguous(memory_format=fmt)
            assert_all_close(ours, run(case, "torch", training, activation=activation), **F32)
            unfused = run(case, "torch", training, activation=activation, functional=True)
            assert_all_close(ours, unfused, **F32)

    @pytest.mark.parametrize("activation", [None, "relu"])
    def test_residual_in_another_layout_and_without_grad(self, activation):
        """A contiguous residual beside channels_last input is laid out like it; no gradient asked for it."""
        case = _in_format(make_case((3, 5, 4, 6)), torch.channels_last)
        residual = torch.randn(3, 5, 4, 6, device=DEVICE)
        x = case["x"].clone().requires_grad_()
        outputs = []
        for backend in ("triton", "torch"):
            with use_backend(backend):
                y = fused_ops.batch_norm(x, None, None, case["weight"], case["bias"], True,
                                         activation=activation, residual=residual)
                (dx,) = torch.autograd.grad(y, x, case["dy"])
            outputs.append((y, dx))
        torch.testing.assert_close(outputs[0], outputs[1], **F32)


def test_launch_settings_regimes_and_caps():
    """Deterministic settings: on chip up to MAX_TILE, split beyond; caps raise clearly."""
    makemore = K.launch_settings(32, 200, 1)
    assert makemore == K.LaunchSettings(
        on_chip=True, tile=K.Tile(32, 128, 1, 16), rows_per_split=32, num_splits=1
    )
    assert K.launch_settings(K.MAX_TILE // K.MIN_BLOCK_C, 256, 1).on_chip
    big = K.launch_settings(K.MAX_TILE // K.MIN_BLOCK_C + 1, 256, 1)
    assert not big.on_chip and big.num_splits * big.rows_per_split >= K.MAX_TILE // K.MIN_BLOCK_C + 1
    for settings in (makemore, big, K.launch_settings(3, 5, 100_000)):
        t = settings.tile
        assert t.block_n * t.block_c * t.block_l <= K.MAX_TILE and 1 <= t.num_warps <= K.MAX_WARPS
    with pytest.raises(ValueError, match="C = "):
        K.launch_settings(64, K.MAX_GRID_DIM1 * K.MAX_BLOCK_C * 2, 1)


@pytest.mark.parametrize(
    "n,c,hw", [(256, 64, 56 * 56), (256, 256, 56 * 56), (256, 512, 28 * 28), (256, 2048, 7 * 7)]
)
def test_launch_settings_at_resnet_shapes(n, c, hw):
    """ResNet-50's BatchNorm shapes take the split regime in both layouts: tiles run along the unit-stride
    axis (channels for channels_last rows, H * W for NCHW), and the partial kernels run about
    SPLIT_PROGRAMS programs (each reducing whole tile rows) so that the fixed-order combine stays short."""
    for flat, unit_axis in (((n * hw, c, 1), "c"), ((n, c, hw), "l")):
        settings = K.launch_settings(*flat)
        tile = settings.tile
        assert not settings.on_chip
        assert tile.block_n * tile.block_c * tile.block_l == K.SPLIT_TILE
        if unit_axis == "c":
            assert tile.block_c == min(c, K.SPLIT_BLOCK_C) and tile.block_l == 1
        else:
            assert tile.block_l >= min(hw, 64)
        programs = settings.num_splits * triton_cdiv(c, tile.block_c)
        assert K.SPLIT_PROGRAMS // 4 <= programs <= 2 * K.SPLIT_PROGRAMS, programs
        assert settings.rows_per_split % tile.block_n == 0
        splits, rows = settings.num_splits, settings.rows_per_split
        assert splits * rows >= flat[0] > (splits - 1) * rows  # no empty split


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
    with pytest.raises(ValueError, match="max_tile"):
        K.launch_settings(64, 8, 1, max_tile=100)


@pytest.mark.gpu
class TestGPU:
    """Compiled kernels on CUDA: large shapes, launch counts, CUDA graphs, no host syncs."""

    @pytest.mark.parametrize("shape", [(65536, 256), (4096, 1000), (512, 4096), (64, 32, 1024)], ids=str)
    @pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=str)
    def test_large_shapes_match_torch(self, shape, dtype, atol):
        case = make_case(shape, dtype=dtype)
        exact = run(
            {k: None if v is None else v.double() for k, v in case.items()},
            "torch",
            True,
            activation="tanh",
            functional=True,
        )
        ours = run(case, "triton", True, activation="tanh")
        theirs = run(case, "torch", True, activation="tanh", functional=True)  # torch's CUDA BatchNorm
        for k in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
            scale = exact[k].abs().max().item() + 1
            err_ours = (ours[k].double() - exact[k]).abs().max().item()
            err_torch = (theirs[k].double() - exact[k]).abs().max().item()
            assert err_ours <= 2 * err_torch + atol * scale, (k, err_ours, err_torch)

    @pytest.mark.parametrize("shape", [(64, 64, 56, 56), (64, 2048, 7, 7)], ids=str)
    @pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
    @pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=str)
    def test_resnet_shapes_with_residual_match_torch(self, shape, fmt, dtype, atol):
        """ResNet's bn2 -> += identity -> relu at ResNet-50 shapes (smaller batch), both layouts."""
        case = _in_format(make_case(shape, dtype), fmt)
        case["residual"] = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
        as_double = {k: v.double() for k, v in case.items()}
        exact = run(as_double, "torch", True, activation="relu", functional=True)
        ours = run(case, "triton", True, activation="relu")
        theirs = run(case, "torch", True, activation="relu", functional=True)  # torch's CUDA BatchNorm
        assert ours["y"].is_contiguous(memory_format=fmt)
        for k in ("y", "dx", "dresidual", "dweight", "dbias", "running_mean", "running_var"):
            scale = exact[k].abs().max().item() + 1
            err_ours = (ours[k].double() - exact[k]).abs().max().item()
            err_torch = (theirs[k].double() - exact[k]).abs().max().item()
            assert err_ours <= 2 * err_torch + atol * scale, (k, err_ours, err_torch)

    @pytest.mark.parametrize("shape,fmt", [((100_000, 64), None), ((32, 64, 56, 56), torch.channels_last)])
    def test_split_is_bitwise_deterministic(self, shape, fmt):
        case = make_case(shape) if fmt is None else _in_format(make_case(shape), fmt)
        first, second = run(case, "triton", True), run(case, "triton", True)
        for k, v in first.items():
            assert (v is None and second[k] is None) or torch.equal(v, second[k]), k

    def test_makemore_shape_launches_one_kernel_each_way(self):
        m = fused_ops.BatchNorm1d(200, activation="tanh", device="cuda")
        x = torch.randn(32, 200, device="cuda", requires_grad=True)
        dy = torch.randn(32, 200, device="cuda")
        m(x).backward(dy)  # compile first
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof_fwd:
            y = m(x)
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof_bwd:
            y.backward(dy)
            torch.cuda.synchronize()
        kernels = lambda prof: [
            e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
        ]
        bn_fwd = [k for k in kernels(prof_fwd) if "batch_norm" in k]
        assert len(bn_fwd) == 1, kernels(prof_fwd)
        # besides our kernel the forward only bumps num_batches_tracked (as torch's module does)
        assert len(kernels(prof_fwd)) <= 2, kernels(prof_fwd)
        assert len([k for k in kernels(prof_bwd) if "batch_norm" in k]) == 1, kernels(prof_bwd)

    def test_no_host_sync_and_cuda_graph_capture(self):
        """momentum=None (1/num_batches_tracked on device): no sync; a captured step replays correctly."""
        m = fused_ops.BatchNorm1d(64, momentum=None, activation="relu", device="cuda")
        ref = nn.BatchNorm1d(64, momentum=None, device="cuda")
        ref.load_state_dict(m.state_dict())
        x = torch.randn(128, 64, device="cuda", requires_grad=True)
        m(x).sum().backward()  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            m(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref(x.detach()), ref(x.detach())
        static_x = torch.randn(128, 64, device="cuda", requires_grad=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the graph, as CUDA graphs require
            m(static_x).sum().backward()
        torch.cuda.current_stream().wait_stream(stream)
        ref(static_x.detach())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            m(static_x).sum().backward()
        for _ in range(3):
            static_x.data.copy_(torch.randn(128, 64, device="cuda"))
            graph.replay()
            ref(static_x.detach())
        torch.cuda.synchronize()
        torch.testing.assert_close(m.running_mean, ref.running_mean, **F32)
        torch.testing.assert_close(m.running_var, ref.running_var, **F32)
        assert m.num_batches_tracked.item() == ref.num_batches_tracked.item() == 6

    def test_torch_compile_runs_the_kernels(self):
        m = fused_ops.BatchNorm1d(64, activation="tanh", device="cuda")
        ref = nn.BatchNorm1d(64, device="cuda")
        ref.load_state_dict(m.state_dict())
        compiled = torch.compile(m)
        for _ in range(2):
            x = torch.randn(256, 64, device="cuda") * 2 + 1
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            compiled(x1).sum().backward()
            torch.tanh(ref(x2)).sum().backward()
            torch.testing.assert_close(x1.grad, x2.grad, **F32)
        torch.testing.assert_close(m.running_var, ref.running_var, **F32)


@pytest.mark.xfail(strict=True, reason="known fault, left to the kernels' owner (issue 13): the kernels' "
                   "float32 variance overflows at float32's max and they give nan where torch gives 0")
@needs_kernels
@pytest.mark.interpreter
def test_variance_overflow_at_float32_max():
    """Found by tests/test_fuzz.py (issue 11), minimal input: one channel holding float32's max."""
    x = torch.tensor([[[torch.finfo(torch.float32).max, -0.29343]], [[-2.1788, 0.56843]]], device=DEVICE)
    with use_backend("triton"):
        ours = fused_ops.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(ours, F.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("regime", ["single", "split"])
@needs_kernels
@pytest.mark.interpreter
def test_eval_with_running_var_near_zero_uses_eps(eps, regime, request):
    """Eval divides by sqrt(running_var + eps): with running_var near 0, eps decides the output, in both
    regimes of the kernels (the other eval tests draw running_var >= 0.5)."""
    if regime == "split":
        request.getfixturevalue("split_regime")
    x = torch.randn(40, 3, 2, device=DEVICE, requires_grad=True)
    running_mean = torch.randn(3, device=DEVICE)
    running_var = torch.rand(3, device=DEVICE) * 1e-6
    weight, bias = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    args = (running_mean, running_var, weight, bias, False, 0.1, eps)
    with use_backend("triton"):
        ours = fused_ops.batch_norm(x, *args)
        (dx,) = torch.autograd.grad(ours.sum(), x)
    expected = F.batch_norm(x, *args)
    (expected_dx,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-5, atol=1e-5)
