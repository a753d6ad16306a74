"""A small ResNet, converted from a torch model, trains as the torch model does.

Two stages of torchvision-style basic blocks (the second one strided, with a 1x1 downsample). The block
is written as a user would write their own to use the fused residual: with fused_ops modules whose
activation is relu, bn1 applies its relu and bn2 the residual add and the relu, in one op each
(README, "convert"). The fused model is `fused_ops.convert` of a copy of the torch model (same
parameters), with the two activations set; both then train with SGD from the same state on the same
batches, and their losses agree within 1e-4 at every step.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_ops


class BasicBlock(nn.Module):
    """torchvision's BasicBlock; runs fused when bn2 is a fused_ops BatchNorm with activation="relu"."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if getattr(self.bn2, "activation", None) == "relu":  # fused: bn1 + relu, then bn2 + add + relu
            out = self.bn1(self.conv1(x))
            return self.bn2(self.conv2(out), residual=identity)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def resnet(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        BasicBlock(16, 16),  # stage 1
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),  # stage 2
        BasicBlock(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def fused_resnet(torch_model: nn.Module) -> tuple[nn.Module, fused_ops.ConversionReport]:
    """convert() a copy (the stem's BatchNorm2d + ReLU fuse by themselves), then fuse each block's relu
    into bn1 and its residual add and relu into bn2."""
    model, report = fused_ops.convert(copy.deepcopy(torch_model), return_report=True)
    for block in model.modules():
        if isinstance(block, BasicBlock):
            block.bn1.activation = "relu"
            block.bn2.activation = "relu"
    return model, report


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"]
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_converted_resnet_trains_like_torch(memory_format, compiled):
    torch_model = resnet().to(memory_format=memory_format)
    model, report = fused_resnet(torch_model)
    # stem + 2 per block + 1 downsample: 10 BatchNorm2d, the stem's ReLU fused by convert() itself
    assert len(report.converted) == 10 and report.fused_activations == 1
    assert all(isinstance(m, fused_ops.BatchNorm2d) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(8, 3, 12, 12, generator=generator).contiguous(memory_format=memory_format),
            torch.randint(0, 10, (8,), generator=generator),
        )
        for _ in range(6)
    ]
    torch_losses = train(torch_model, torch_model, batches)
    fused_losses = train(model, forward, batches)
    assert max(abs(a - b) for a, b in zip(fused_losses, torch_losses, strict=True)) < 1e-4, (
        fused_losses,
        torch_losses,
    )
    assert fused_losses[-1] < fused_losses[0]  # it does learn
    for (name, a), b in zip(model.state_dict().items(), torch_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)


def train(model: nn.Module, forward, batches, lr: float = 0.05) -> list[float]:
    """SGD with momentum on `model`'s parameters, calling `forward` (the model, or its compiled twin)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, target in batches:
        loss = F.cross_entropy(forward(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
