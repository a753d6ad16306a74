"""The seed notebook's makemore MLP as an `nn.Module`, and sampling names from it.

    idx (B, block_size) -> Embedding -> (B, block_size, n_embd) -> Flatten -> (B, block_size * n_embd)
        -> Linear -> BatchNorm1d -> Tanh -> (B, n_hidden) -> Linear -> logits (B, vocab_size)

The layers are always built as torch modules in one `nn.Sequential`. With `fused=True`,
`fused_ops.convert` then swaps the BatchNorm1d for `fused_ops.BatchNorm1d` with tanh fused in (leaving
`nn.Identity` where the Tanh was) and the loss is `fused_ops.cross_entropy`; with `fused=False` the
model keeps torch's modules and `F.cross_entropy`. Both share parameter names, so a state_dict saved
from one loads into the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fused_ops import convert, cross_entropy
from fused_ops.makemore.data import Vocab


class MLP(nn.Module):
    """Character-level MLP language model (Bengio et al. 2003) with BatchNorm, as in the notebook.

    Initialisation as in makemore part 3: the embedding ~ N(0, 1); the first Linear ~ N(0, (5/3)^2 / fan_in),
    tanh's Kaiming gain, and no bias since the BatchNorm after it subtracts the mean anyway; the output
    Linear ~ N(0, 0.1^2 / fan_in) with zero bias, so the first loss is close to log(vocab_size).
    Pass `generator` to make the initialisation independent of the global RNG.
    """

    def __init__(
        self,
        vocab_size: int = 27,
        block_size: int = 3,
        n_embd: int = 10,
        n_hidden: int = 200,
        *,
        fused: bool = True,
        bn_momentum: float | None = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.fused = fused
        net = nn.Sequential(
            nn.Embedding(vocab_size, n_embd),
            nn.Flatten(1),
            nn.Linear(block_size * n_embd, n_hidden, bias=False),
            nn.BatchNorm1d(n_hidden, momentum=bn_momentum),
            nn.Tanh(),
            nn.Linear(n_hidden, vocab_size),
        )
        _init_weights(net, generator)
        self.net = convert(net) if fused else net
        self.loss_fn = cross_entropy if fused else F.cross_entropy

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, block_size) int64 -> logits (B, vocab_size), and the mean loss when targets (B,) is
        given."""
        logits = self.net(idx)
        loss = None if targets is None else self.loss_fn(logits, targets)
        return logits, loss


def _init_weights(net: nn.Sequential, generator: torch.Generator | None) -> None:
    embedding, hidden, output = net[0], net[2], net[5]
    with torch.no_grad():
        nn.init.normal_(embedding.weight, std=1.0, generator=generator)
        nn.init.normal_(hidden.weight, std=(5 / 3) / math.sqrt(hidden.in_features), generator=generator)
        nn.init.normal_(output.weight, std=0.1 / math.sqrt(output.in_features), generator=generator)
        nn.init.zeros_(output.bias)


@torch.no_grad()
def sample_names(
    model: MLP, vocab: Vocab, count: int, *, generator: torch.Generator | None = None, max_len: int = 32
) -> list[str]:
    """Draw `count` names at once: feed "..." and sample one character per step until "." (or max_len).

    Runs the model in eval mode (BatchNorm uses its running statistics) and restores its mode after.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    context = torch.zeros((count, model.block_size), dtype=torch.long, device=device)
    drawn = []
    for _ in range(max_len):
        logits, _ = model(context)
        ix = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)  # (count, 1)
        drawn.append(ix)
        context = torch.cat([context[:, 1:], ix], dim=1)
    model.train(was_training)
    names = []
    for row in torch.cat(drawn, dim=1).tolist():
        end = row.index(0) if 0 in row else len(row)
        names.append(vocab.decode(row[:end]))
    return names
