"""The main job: train the makemore MLP on the bundled names, evaluate it, and sample names from it.

Recipe (the notebook's): SGD, batch 32, n_embd 10, n_hidden 200, learning rate 0.1, then 0.01 for the
last quarter of the steps. Minibatch indices come from a `torch.Generator` seeded with `--seed`, and
the initial weights from another one, so a run is reproducible and the fused and unfused models see
the same batches from the same start.

    python -m fused_ops train [--steps N] [--device cpu|cuda] [--seed S] [--no-fused]
                              [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from fused_ops.data import Split, load_dataset
from fused_ops.models import MLP, sample_names

DEFAULT_STEPS = 50_000  # val loss 2.145; ~1.5 min of one core with the torch path (CPU)
EVAL_CHUNK = 32_768  # examples per eval forward: bounds eval memory at ~30 MB for n_hidden 200
LOG_EVERY = 200  # steps between progress-bar updates (each one reads a loss back to the host)


@dataclass
class TrainConfig:
    steps: int = DEFAULT_STEPS
    batch_size: int = 32
    n_embd: int = 10
    n_hidden: int = 200
    lr: float = 0.1
    final_lr: float = 0.01  # for the last quarter of the steps
    seed: int = 42
    device: str = "cpu"
    fused: bool = True

    @property
    def decay_step(self) -> int:
        """First step trained with `final_lr`."""
        return self.steps - self.steps // 4


def build_model(config: TrainConfig, vocab_size: int, block_size: int) -> MLP:
    """The MLP with weights drawn from a generator seeded by `config.seed`, moved to `config.device`."""
    init_generator = torch.Generator().manual_seed(config.seed)
    model = MLP(
        vocab_size, block_size, config.n_embd, config.n_hidden, fused=config.fused, generator=init_generator
    )
    return model.to(config.device)


def train_model(
    model: torch.nn.Module, train: Split, config: TrainConfig, *, progress: bool = True
) -> torch.Tensor:
    """Run `config.steps` SGD steps on minibatches of `train`; returns the per-step losses (steps,).

    `model(X, Y)` must return (logits, loss). The losses stay on the device; the only host reads are
    the progress-bar updates every LOG_EVERY steps.
    """
    device = torch.device(config.device)
    X, Y = train.X.to(device), train.Y.to(device)
    batch_generator = torch.Generator(device=device).manual_seed(config.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    losses = torch.empty(config.steps, device=device)
    decay_step = config.decay_step
    model.train()
    bar = tqdm(range(config.steps), desc="train", unit="step", disable=not progress, mininterval=0.5)
    for step in bar:
        if step == decay_step:
            for group in optimizer.param_groups:
                group["lr"] = config.final_lr
        ix = torch.randint(0, X.shape[0], (config.batch_size,), device=device, generator=batch_generator)
        _, loss = model(X[ix], Y[ix])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        if progress and (step + 1) % LOG_EVERY == 0:
            bar.set_postfix(
                loss=f"{losses[step + 1 - LOG_EVERY : step + 1].mean().item():.4f}", refresh=False
            )
    bar.close()
    return losses


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, chunk: int = EVAL_CHUNK) -> float:
    """Mean loss over the whole split, in eval mode (BatchNorm uses its running statistics)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(split), chunk):
        X, Y = split.X[start : start + chunk].to(device), split.Y[start : start + chunk].to(device)
        _, loss = model(X, Y)
        total += loss.double() * Y.shape[0]
    model.train(was_training)
    return (total / len(split)).item()


def save_loss_plot(losses: torch.Tensor, path: str) -> None:
    """PNG of the per-step loss (faint) and its average over windows of ~1% of the run."""
    pyplot = _import_pyplot()
    losses = losses.detach().float().cpu()
    window = max(1, len(losses) // 100)
    usable = len(losses) // window * window
    smooth = losses[:usable].view(-1, window).mean(1)
    fig, ax = pyplot.subplots(figsize=(8, 4.5))
    ax.plot(
        range(len(losses)), losses.numpy(), color="tab:blue", alpha=0.25, linewidth=0.5, label="step loss"
    )
    ax.plot(
        [(i + 0.5) * window for i in range(len(smooth))],
        smooth.numpy(),
        color="tab:blue",
        label=f"mean over {window} steps",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("makemore MLP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: --plot needs matplotlib, which is not installed: pip install 'fused_ops[plot]'")
    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"SGD steps (default {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="seeds the initial weights, batches and samples (default 42)"
    )
    parser.add_argument(
        "--no-fused",
        dest="fused",
        action="store_false",
        help="use torch's own BatchNorm1d, Tanh and cross_entropy",
    )
    parser.add_argument("--json", metavar="PATH", help="write the losses, steps, seconds and samples as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the loss curve (needs matplotlib)")


def main(args: argparse.Namespace) -> int:
    """Train, evaluate, sample and report, as the CLI's `train` command."""
    if args.steps < 1:
        sys.exit(f"error: --steps must be >= 1, got {args.steps}")
    if args.plot:
        _import_pyplot()  # fail before training, not after
    config = TrainConfig(steps=args.steps, seed=args.seed, device=args.device, fused=args.fused)
    data = load_dataset()
    model = build_model(config, len(data.vocab), data.block_size)
    print(
        f"makemore MLP ({'fused_ops' if config.fused else 'torch'} modules, "
        f"{sum(p.numel() for p in model.parameters())} parameters) on {config.device}: "
        f"{config.steps} steps, batch {config.batch_size}, lr {config.lr} then {config.final_lr} "
        f"from step {config.decay_step}"
    )
    threads = torch.get_num_threads()
    if torch.device(config.device).type == "cpu":
        # (32, 200) matmuls are too small to split: extra intra-op threads only add synchronisation, and
        # on a busy machine they spin-wait. One thread is as fast alone and far faster under load.
        torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        losses = train_model(model, data.train, config)
        if torch.device(config.device).type == "cuda":
            torch.cuda.synchronize()
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    results = {split: evaluate(model, getattr(data, split)) for split in ("train", "val", "test")}
    sample_generator = torch.Generator(device=config.device).manual_seed(config.seed)
    samples = sample_names(model, data.vocab, 20, generator=sample_generator)

    print(f"trained {config.steps} steps in {seconds:.1f} s ({1e6 * seconds / config.steps:.0f} us/step)")
    for split, loss in results.items():
        print(f"{split} loss {loss:.4f}")
    print(f"{len(samples)} names sampled from the model:")
    for name in samples:
        print(f"  {name}")
    if args.json:
        report = {f"{split}_loss": loss for split, loss in results.items()}
        report.update(steps=config.steps, seconds=seconds, samples=samples)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        save_loss_plot(losses, args.plot)
    return 0
