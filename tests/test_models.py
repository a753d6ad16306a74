"""The makemore MLP: shapes, the fused structure, state_dict round trips, sampling."""

import math

import pytest
import torch
from torch import nn

import fused_ops
from fused_ops.makemore.data import Vocab, load_words
from fused_ops.makemore.model import MLP, sample_names


def make(fused: bool, seed: int = 0, **kwargs) -> MLP:
    return MLP(fused=fused, generator=torch.Generator().manual_seed(seed), **kwargs)


def batch(n: int = 32, block_size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 27, (n, block_size)), torch.randint(0, 27, (n,))


@pytest.mark.parametrize("fused", [True, False])
def test_shapes(fused):
    model = make(fused, n_embd=7, n_hidden=50, block_size=4)
    X, Y = batch(16, block_size=4)
    logits, loss = model(X, Y)
    assert logits.shape == (16, 27) and loss.shape == ()
    assert model(X)[1] is None
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "net.0.weight": (27, 7), "net.2.weight": (50, 28), "net.3.weight": (50,), "net.3.bias": (50,),
        "net.5.weight": (27, 50), "net.5.bias": (27,),
    }  # fmt: skip


def test_fused_model_uses_the_fused_modules():
    fused, plain = make(True), make(False)
    assert type(fused.net[3]) is fused_ops.BatchNorm1d and fused.net[3].activation == "tanh"
    assert type(fused.net[4]) is nn.Identity
    assert fused.loss_fn is fused_ops.cross_entropy
    assert type(plain.net[3]) is nn.BatchNorm1d and type(plain.net[4]) is nn.Tanh
    assert plain.loss_fn is torch.nn.functional.cross_entropy


def test_same_generator_seed_gives_the_same_weights_fused_or_not():
    fused, plain = make(True, seed=3), make(False, seed=3)
    for (name, a), (_, b) in zip(fused.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(make(False, seed=4).net[0].weight, plain.net[0].weight)


def test_initial_loss_is_near_uniform():
    X, Y = batch(512)
    _, loss = make(False)(X, Y)
    assert abs(loss.item() - math.log(27)) < 0.05


@pytest.mark.parametrize("source_fused", [True, False])
def test_state_dict_loads_between_fused_and_unfused(source_fused):
    """Train the source a few steps (moving the running stats too), load it into the other kind, compare."""
    source, target = make(source_fused, seed=1), make(not source_fused, seed=2)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1)
    for _ in range(3):
        _, loss = source(*batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert source.state_dict().keys() == target.state_dict().keys()
    target.load_state_dict(source.state_dict())
    assert target.net[3].num_batches_tracked.item() == 3
    X, Y = batch()
    for train_mode in (True, False):
        source.train(train_mode)
        target.train(train_mode)
        (logits_s, loss_s), (logits_t, loss_t) = source(X, Y), target(X, Y)
        torch.testing.assert_close(logits_t, logits_s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_t, loss_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_sample_names(fused):
    model = make(fused)
    model.train()
    vocab = Vocab.from_words(load_words())
    names = sample_names(model, vocab, 20, generator=torch.Generator().manual_seed(0), max_len=12)
    assert len(names) == 20
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyz") and len(name) <= 12 for name in names)
    assert model.training, "sampling must restore the training mode"
    again = sample_names(model, vocab, 20, generator=torch.Generator().manual_seed(0), max_len=12)
    assert again == names
