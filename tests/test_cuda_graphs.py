"""A whole training step of the makemore MLP (forward, backward, SGD) captured in a CUDA graph.

The fused ops never sync with the host (no .item(), no value-dependent Python branch on CUDA), so a
step captures with `torch.cuda.graph` and replays on new data copied into the static inputs, with
the same losses and parameters as eager steps. Both backends run: the Triton kernels ("auto" on CUDA)
and the PyTorch path. GPU only (marked gpu).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fused_ops
from fused_ops.backend import triton_available
from fused_ops.makemore.model import MLP

pytestmark = pytest.mark.gpu

BATCH, STEPS, LR = 32, 5, 0.1


def _sgd_step(model: MLP, optimizer: torch.optim.Optimizer, idx: torch.Tensor, targets: torch.Tensor):
    optimizer.zero_grad(set_to_none=True)
    _, loss = model(idx, targets)
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("backend", ["auto", "torch"], ids=["triton", "torch"])
@pytest.mark.parametrize("bn_momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_training_step_replays_like_eager(backend, bn_momentum):
    if backend == "auto" and not triton_available():
        pytest.skip("triton is not installed")
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(5)
    model = MLP(bn_momentum=bn_momentum, generator=generator).to(device)
    eager = copy.deepcopy(model)
    batches = [
        (torch.randint(0, 27, (BATCH, 3), device=device), torch.randint(0, 27, (BATCH,), device=device))
        for _ in range(STEPS + 3)
    ]

    with fused_ops.use_backend(backend):
        eager_opt = torch.optim.SGD(eager.parameters(), lr=LR)
        expected = [_sgd_step(eager, eager_opt, *batch).item() for batch in batches]

        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        static_idx, static_targets = batches[0][0].clone(), batches[0][1].clone()
        # Warm up on a side stream (compiles the Triton kernels, allocates the optimizer's state), as the
        # CUDA-graphs recipe for whole-network capture asks; these are the first 3 training steps.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        losses = []
        with torch.cuda.stream(side):
            for idx, targets in batches[:3]:
                static_idx.copy_(idx)
                static_targets.copy_(targets)
                losses.append(_sgd_step(model, optimizer, static_idx, static_targets).item())
        torch.cuda.current_stream().wait_stream(side)

        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):  # captured, not run: the replays below take the remaining steps
            _, static_loss = model(static_idx, static_targets)
            static_loss.backward()
            optimizer.step()

    for idx, targets in batches[3:]:
        static_idx.copy_(idx)
        static_targets.copy_(targets)
        graph.replay()
        losses.append(static_loss.item())

    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    assert len(set(losses)) > 1  # the replays trained: the loss moved
    for (name, a), b in zip(eager.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
