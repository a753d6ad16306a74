"""The bundled names and the seed notebook's split."""

import random

import torch

from fused_ops.makemore.data import Vocab, build_examples, load_dataset, load_words


def test_bundled_names():
    words = load_words()
    assert len(words) == 32033
    assert words[:3] == ["emma", "olivia", "ava"]
    assert all(word and word.isalpha() and word.islower() for word in words)


def test_vocab_is_the_notebooks():
    vocab = Vocab.from_words(load_words())
    assert len(vocab) == 27
    assert vocab.itos[0] == "." and vocab.itos[1] == "a" and vocab.itos[26] == "z"
    assert vocab.stoi["."] == 0 and vocab.stoi["m"] == 13
    assert vocab.decode([5, 13, 13, 1]) == "emma"


def test_split_sizes_equal_the_notebooks():
    data = load_dataset()
    assert (len(data.train), len(data.val), len(data.test)) == (182625, 22655, 22866)
    for split in (data.train, data.val, data.test):
        assert split.X.shape == (len(split), 3) and split.X.dtype == torch.long
        assert split.Y.shape == (len(split),) and split.Y.dtype == torch.long
        assert 0 <= split.X.min() and split.X.max() < 27 and 0 <= split.Y.min() and split.Y.max() < 27


def test_split_follows_random_seed_42_shuffle():
    """The first training name is the first name of the notebook's shuffle; the global RNG is untouched."""
    state = random.getstate()
    data = load_dataset()
    assert random.getstate() == state
    words = load_words()
    random.seed(42)
    random.shuffle(words)
    first = words[0]
    n = len(first) + 1  # examples of the first name, its final "." included
    assert data.vocab.decode(data.train.Y[:n].tolist()) == first + "."
    assert data.train.X[:n].tolist()[:2] == [[0, 0, 0], [0, 0, data.vocab.stoi[first[0]]]]
    # the 80/10/10 boundaries: the first val example starts the name at position int(0.8 * 32033)
    val_first = words[int(0.8 * len(words))]
    assert data.vocab.decode(data.val.Y[: len(val_first)].tolist()) == val_first


def test_build_examples_contexts_slide_over_the_name():
    vocab = Vocab.from_words(load_words())
    split = build_examples(["ab"], vocab, block_size=3)
    assert split.X.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2]]
    assert split.Y.tolist() == [1, 2, 0]
    wide = build_examples(["ab"], vocab, block_size=5)
    assert wide.X.shape == (3, 5) and wide.X[2].tolist() == [0, 0, 0, 1, 2]
