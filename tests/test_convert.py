"""fused_ops.convert: torch's BatchNorm1d/2d/3d and SyncBatchNorm swapped for the fused modules, BN +
ReLU/Tanh/SiLU fused inside nn.Sequential, every attribute kept, a report of what changed (and a warning
when nothing did); with a process group, swapped for SyncBatchNorm over it (the multi-rank results:
tests/test_ddp_train.py)."""
import logging
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fused_ops
from fused_ops.backend import use_backend
from fused_ops.distributed.sync_batch_norm import SyncBatchNorm


@pytest.fixture(autouse=True)
def torch_backend():
    with use_backend("torch"):
        yield


class Block(nn.Module):
    """A non-Sequential parent: its BatchNorm1d is converted but nothing is fused."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width, momentum=None)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.lin(x)))


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 8),
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6, affine=False), nn.ReLU()),
        Block(6),
        nn.BatchNorm1d(6, track_running_stats=False),
        nn.Linear(6, 3),
    )


def train_steps(model: nn.Module, batches) -> list[torch.Tensor]:
    """Forward + backward on each batch; returns outputs and every gradient, in order."""
    out = []
    for x in batches:
        model.zero_grad()
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out += [y.detach()] + [p.grad.clone() for p in model.parameters()]
    return out


def test_convert_nested_model_matches_unconverted():
    reference = make_model()
    model = make_model()
    model.load_state_dict(reference.state_dict())
    params_before = {name: p for name, p in model.named_parameters()}
    buffers_before = {name: b for name, b in model.named_buffers()}

    converted = fused_ops.convert(model)
    assert converted is model
    assert isinstance(model[1], fused_ops.BatchNorm1d) and model[1].activation == "tanh"
    assert isinstance(model[2], nn.Identity)
    assert isinstance(model[3][1], fused_ops.BatchNorm1d) and model[3][1].activation == "relu"
    assert isinstance(model[3][2], nn.Identity)
    # model[4] is not a Sequential: its BatchNorm1d converts, the activation stays apart
    assert isinstance(model[4].bn, fused_ops.BatchNorm1d) and model[4].bn.activation is None
    assert isinstance(model[4].act, nn.Tanh)
    assert isinstance(model[5], fused_ops.BatchNorm1d) and not model[5].track_running_stats
    assert model[4].bn.momentum is None and model[3][1].affine is False

    # the very same parameter and buffer tensors, under the same names
    assert {n: p for n, p in model.named_parameters()} == params_before
    assert all(dict(model.named_buffers())[n] is b for n, b in buffers_before.items())
    assert list(model.state_dict()) == list(reference.state_dict())

    batches = [torch.randn(16, 5) * 2 + 1 for _ in range(3)]
    for got, exp in zip(train_steps(model, batches), train_steps(reference, batches), strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4)
    for (name, b), exp in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, exp, atol=1e-5, rtol=1e-4, msg=name)
    model.eval(), reference.eval()
    x = torch.randn(4, 5)
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


def test_convert_keeps_flags_requires_grad_and_dtype():
    bn = nn.BatchNorm1d(4, dtype=torch.float64).eval()
    bn.weight.requires_grad_(False)
    fused = fused_ops.convert(bn)  # a root BatchNorm1d is returned converted
    assert isinstance(fused, fused_ops.BatchNorm1d)
    assert not fused.training and not fused.weight.requires_grad and fused.bias.requires_grad
    assert fused.weight is bn.weight and fused.running_var is bn.running_var
    assert fused.running_mean.dtype == torch.float64 and fused.weight.device == bn.weight.device


def test_convert_shared_module_shares_state():
    """A BatchNorm1d used twice stays one set of parameters and buffers."""
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(3, 3), bn, nn.Linear(3, 3), bn)
    fused_ops.convert(model)
    assert type(model[1]) is type(model[3]) is fused_ops.BatchNorm1d  # both uses converted
    assert model[1].weight is model[3].weight and model[1].num_batches_tracked is model[3].num_batches_tracked
    model(torch.randn(6, 3))
    assert bn.num_batches_tracked.item() == 2


def test_convert_is_idempotent_and_fuses_fused_modules():
    model = nn.Sequential(fused_ops.BatchNorm1d(4, unbiased=True), nn.ReLU(), nn.BatchNorm1d(4), nn.Tanh())
    fused_ops.convert(model)
    assert [type(m) for m in model] == [fused_ops.BatchNorm1d, nn.Identity] * 2
    assert model[0].unbiased and model[0].activation == "relu" and model[2].activation == "tanh"
    first = list(model)
    fused_ops.convert(model)
    assert list(model) == first  # nothing left to convert


def test_convert_ignores_other_modules_and_warns_when_nothing_converts():
    """No BatchNorm that convert() handles: the model is unchanged, and a warning says so, naming the
    subclass it kept and why."""

    class ScaledBatchNorm(nn.BatchNorm2d):  # its own forward: a swap would drop it
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(
        nn.Conv2d(3, 3, 1), nn.GroupNorm(1, 3), ScaledBatchNorm(3), nn.ReLU(), nn.LayerNorm(4)
    )
    before = list(model)
    with pytest.warns(UserWarning, match=r"0 BatchNorm layer\(s\) converted.*is unchanged.*ScaledBatchNorm"):
        _, report = fused_ops.convert(model, return_report=True)
    assert list(model) == before
    assert report.converted == [] and [u.name for u in report.unconverted] == ["2"]
    assert "may have its own forward" in str(report)


def test_convert_cnn_fuses_and_reports(caplog):
    """The new user's case: Conv2d -> BatchNorm2d -> ReLU/SiLU comes back converted and fused, the
    report lists each module, the log has it, and the model computes what the torch model did."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, eps=1e-3, momentum=0.01), nn.SiLU(),
            nn.MaxPool2d(1),
            nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4, affine=False),
        )

    reference, model = make(), make()
    with caplog.at_level(logging.INFO, logger="fused_ops"), warnings.catch_warnings():
        warnings.simplefilter("error")  # something converted: no warning
        converted, report = fused_ops.convert(model, return_report=True)
    assert converted is model
    kinds = [fused_ops.BatchNorm2d, nn.Identity, nn.Conv2d, fused_ops.BatchNorm2d, nn.Identity]
    assert [type(m) for m in model[1:6]] == kinds
    assert (model[1].activation, model[4].activation, model[8].activation) == ("relu", "silu", None)
    assert [(c.name, c.fused) for c in report.converted] == [("1", "2"), ("4", "5"), ("8", None)]
    assert report.fused_activations == 2 and report.unconverted == []
    text = str(report)
    assert text.splitlines()[0] == (
        "fused_ops.convert(Sequential): 3 BatchNorm layer(s) converted, 2 activation(s) fused"
    )
    assert text.splitlines()[1].split() == [
        "1", "nn.BatchNorm2d(8)", "->", "fused_ops.BatchNorm2d(8,", "activation='relu')", "[fused", "2]"
    ]
    # no activation fused: nothing after the new module
    assert text.splitlines()[3].split() == ["8", "nn.BatchNorm2d(4)", "->", "fused_ops.BatchNorm2d(4)"]
    assert text in caplog.text
    x = torch.randn(4, 3, 6, 5).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)
    for (name, b), exp in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, exp, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["1d", "2d", "3d", "sync"])
@pytest.mark.parametrize(
    "options",
    [
        {"eps": 1e-3, "momentum": 0.3},
        {"momentum": None, "affine": False},
        {"track_running_stats": False, "eps": 0.5},
        {"bias": False, "momentum": 0.0},
    ],
    ids=["eps_momentum", "cumulative_no_affine", "no_tracking", "no_bias"],
)
def test_convert_copies_every_attribute(kind, options, torch_batch_norm):
    """eps, momentum, affine, track_running_stats and bias survive, in a plain and a fusing conversion."""
    torch_cls = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}.get(kind, nn.SyncBatchNorm)
    group = object() if kind == "sync" else None
    extra = {"process_group": group} if kind == "sync" else {}
    for fuse in (False, True):
        bn = torch_batch_norm(torch_cls, 5, **options, **extra)
        model = nn.Sequential(bn, nn.ReLU()) if fuse else nn.Sequential(bn)
        fused_ops.convert(model)
        new = model[0]
        assert type(new).__name__ == torch_cls.__name__ and type(new).__module__.startswith("fused_ops")
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new, attr) == getattr(bn, attr), attr
        assert (new.bias is None) == (bn.bias is None) and new.bias is bn.bias and new.weight is bn.weight
        assert new.activation == ("relu" if fuse else None)
        if kind == "sync":
            assert new.process_group is group


def test_never_refuses_a_batch_norm_with_an_activation():
    """A BatchNorm that already applies relu, followed by nn.Tanh: relu stays, Tanh stays separate (with
    and without a process group), and the report says why the Tanh was not fused."""
    for process_group in (None, "group"):
        model = nn.Sequential(fused_ops.BatchNorm1d(4, activation="relu"), nn.Tanh())
        reference = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU(), nn.Tanh())
        reference[0].load_state_dict(model[0].state_dict())
        group = None if process_group is None else object()
        _, report = fused_ops.convert(model, process_group=group, return_report=True)
        assert model[0].activation == "relu" and isinstance(model[1], nn.Tanh)
        assert "already has activation='relu'" in str(report)
        if group is not None:
            assert type(model[0]) is SyncBatchNorm and model[0].process_group is group
        x = torch.randn(6, 4)  # outside torch.distributed the SyncBatchNorm computes locally
        torch.testing.assert_close(model(x), reference(x))


def test_torch_sync_batch_norm_converts_with_its_group():
    group = object()
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.SyncBatchNorm(4, process_group=group), nn.ReLU())
    _, report = fused_ops.convert(model, return_report=True)
    assert type(model[1]) is SyncBatchNorm and model[1].process_group is group
    assert model[1].activation == "relu"
    line = (
        "nn.SyncBatchNorm(4)  -> fused_ops.SyncBatchNorm(4, activation='relu', process_group=<given>)  "
        "[fused 2]"
    )
    assert line in str(report)


def test_second_convert_reports_already_fused_without_warning():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh())
    fused_ops.convert(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = fused_ops.convert(model, return_report=True)
    assert report.converted == [] and report.has_fused_batch_norm
    assert "1: kept" not in str(report) and "already fused_ops'" in str(report)


@pytest.fixture
def world():
    """A real process group of one rank (gloo, in this process): SyncBatchNorm over it computes its
    statistics locally, without collectives, so it must match the unconverted model."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_convert_with_process_group_makes_every_batch_norm_sync(world):
    reference = make_model()
    model = make_model()
    model.load_state_dict(reference.state_dict())
    tensors = model.state_dict(keep_vars=True)

    assert fused_ops.convert(model, process_group=world) is model
    sync = [model[1], model[3][1], model[4].bn, model[5]]
    assert all(type(m) is SyncBatchNorm and m.process_group is world for m in sync)
    assert [m.activation for m in sync] == ["tanh", "relu", None, None]
    assert isinstance(model[2], nn.Identity) and isinstance(model[4].act, nn.Tanh)
    assert (model[4].bn.momentum, model[3][1].affine, model[5].track_running_stats) == (None, False, False)
    assert model.state_dict(keep_vars=True).keys() == tensors.keys()
    assert all(v is tensors[k] for k, v in model.state_dict(keep_vars=True).items())

    batches = [torch.randn(16, 5) * 2 + 1 for _ in range(3)]
    for got, exp in zip(train_steps(model, batches), train_steps(reference, batches), strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4)
    for (name, b), exp in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, exp, atol=1e-5, rtol=1e-4, msg=name)


def test_convert_with_process_group_turns_fused_modules_sync(world):
    """fused_ops.BatchNorm1d (fused activation, unbiased kept) and a root BatchNorm1d become SyncBatchNorm."""
    model = nn.Sequential(fused_ops.BatchNorm1d(4, unbiased=True, activation="relu"), nn.Linear(4, 4))
    fused_ops.convert(model, process_group=world)
    assert type(model[0]) is SyncBatchNorm and (model[0].activation, model[0].unbiased) == ("relu", True)
    bn = fused_ops.BatchNorm1d(3, activation="tanh").eval()
    root = fused_ops.convert(bn, process_group=world)
    assert type(root) is SyncBatchNorm and root.activation == "tanh" and not root.training
    assert root.weight is bn.weight and root.running_mean is bn.running_mean


def test_existing_sync_batch_norm_keeps_its_group(world):
    """Already synchronised modules stay as they are, and fusing an activation into one keeps its group."""
    other = object()  # a group of the caller's: convert only passes it along
    kept = SyncBatchNorm(4, activation="relu", process_group=other)
    model = nn.Sequential(kept, nn.Linear(4, 4), SyncBatchNorm(4, process_group=other), nn.Tanh())
    fused_ops.convert(model)
    assert model[0] is kept
    assert type(model[2]) is SyncBatchNorm and model[2].activation == "tanh"
    assert model[2].process_group is other
    assert isinstance(model[3], nn.Identity)
    first = list(model)
    fused_ops.convert(model, process_group=world)
    assert list(model) == first  # nothing left to convert


# Issue 11: tests that a planted bug got through. Each checks what the convert tests above left out.
def test_convert_keeps_every_hyperparameter_and_eval_output():
    """eps, momentum, affine, tracking: carried over (the tests above used only the default eps). Eval
    with running_var near 0 makes eps decide the output."""
    bn = nn.BatchNorm1d(5, eps=0.25, momentum=0.7)
    with torch.no_grad():
        bn.running_var.uniform_(0, 1e-4)
        bn.running_mean.normal_()
    model = nn.Sequential(bn).eval()
    x = torch.randn(4, 5)
    expected = model(x)
    fused_ops.convert(model)
    assert (model[0].eps, model[0].momentum) == (0.25, 0.7)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("with_group", [False, True], ids=["no_group", "process_group"])
def test_convert_never_refuses_a_module_with_an_activation(with_group, request):
    """A fused BatchNorm1d that already has an activation, followed by nn.Tanh, keeps its activation and
    the Tanh: fusing again would silently replace its relu."""
    group = request.getfixturevalue("world") if with_group else None
    model = nn.Sequential(fused_ops.BatchNorm1d(4, activation="relu"), nn.Tanh())
    x = torch.randn(6, 4)
    expected = model(x)
    fused_ops.convert(model, process_group=group)
    assert model[0].activation == "relu" and isinstance(model[1], nn.Tanh)
    torch.testing.assert_close(model(x), expected)
