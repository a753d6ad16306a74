"""The bundled makemore names data set, its vocabulary and the seed notebook's train/val/test split.

`names.txt` (32,033 names) comes from Karpathy's makemore project (MIT licensed). It ships as package
data and is read with `importlib.resources`, so it loads from an installed wheel as well as from a
source checkout.

The split reproduces the notebook exactly: `random.seed(42)`, shuffle the names, 80/10/10, and a
context of `block_size` characters before each target, padded with "." (index 0) at the start of a name.
With block_size 3 that gives 182625 / 22655 / 22866 examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources

import torch

END = "."  # start padding and end-of-name token, index 0


def load_words() -> list[str]:
    """The 32,033 bundled names, in file order."""
    text = resources.files("fused_ops.makemore").joinpath("names.txt").read_text(encoding="utf-8")
    return text.splitlines()


@dataclass(frozen=True)
class Vocab:
    """Characters <-> indices: "." is 0, the letters follow in sorted order (a = 1 ... z = 26)."""

    itos: tuple[str, ...]

    @classmethod
    def from_words(cls, words: list[str]) -> Vocab:
        return cls((END, *sorted(set("".join(words)))))

    @property
    def stoi(self) -> dict[str, int]:
        return {ch: i for i, ch in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def decode(self, indices: list[int]) -> str:
        return "".join(self.itos[i] for i in indices)


@dataclass(frozen=True)
class Split:
    """Examples of one split. X: (N, block_size) int64 contexts, Y: (N,) int64 next characters."""

    X: torch.Tensor
    Y: torch.Tensor

    def __len__(self) -> int:
        return self.Y.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.X.to(device), self.Y.to(device))


@dataclass(frozen=True)
class Dataset:
    vocab: Vocab
    block_size: int
    train: Split
    val: Split
    test: Split


def build_examples(words: list[str], vocab: Vocab, block_size: int) -> Split:
    """Every (context, next character) pair of `words`; each name ends with "."."""
    stoi = vocab.stoi
    contexts, targets = [], []
    for word in words:
        context = [0] * block_size
        for ch in word + END:
            ix = stoi[ch]
            contexts.append(context)
            targets.append(ix)
            context = context[1:] + [ix]
    X = torch.tensor(contexts, dtype=torch.long).view(-1, block_size)
    return Split(X, torch.tensor(targets, dtype=torch.long))


def load_dataset(block_size: int = 3, seed: int = 42) -> Dataset:
    """The notebook's split: shuffle the names with `random.Random(seed)`, then 80% / 10% / 10%.

    A private `random.Random(seed)` gives the same shuffle as the notebook's `random.seed(seed)`
    without touching the global RNG.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    words = load_words()
    vocab = Vocab.from_words(words)
    random.Random(seed).shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return Dataset(
        vocab=vocab,
        block_size=block_size,
        train=build_examples(words[:n1], vocab, block_size),
        val=build_examples(words[n1:n2], vocab, block_size),
        test=build_examples(words[n2:], vocab, block_size),
    )
