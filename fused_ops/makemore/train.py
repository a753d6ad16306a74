"""The main job: train the makemore MLP on the bundled names, evaluate it, and sample names from it.

Recipe (the notebook's): SGD, batch 32, n_embd 10, n_hidden 200, learning rate 0.1, then 0.01 for the
last quarter of the steps. Minibatch indices come from a `torch.Generator` seeded with `--seed`, and
the initial weights from another one, so a run is reproducible and the fused and unfused models see
the same batches from the same start.

Data-parallel training (`--ddp`, one process per device, started by torchrun): every process builds the
same model, draws the same global batches and trains on its `shard_slice` of each batch's rows;
DistributedDataParallel averages the gradients and SyncBatchNorm computes the BatchNorm statistics over
the whole batch, so the losses are those of one process training on the whole batch (up to float32
rounding). Rank 0 evaluates, samples and reports.

    python -m fused_ops train [--steps N] [--device cpu|cuda] [--seed S] [--no-fused]
                              [--json PATH] [--plot PATH]
    torchrun --nproc_per_node 2 -m fused_ops train --ddp [same options]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fused_ops import BackendUnavailableError, convert, use_backend
from fused_ops.distributed import (
    DDPInfo,
    all_reduce_sum,
    cleanup_ddp,
    rank,
    setup_ddp,
    shard_slice,
    world_size,
)
from fused_ops.makemore.data import Split, load_dataset
from fused_ops.makemore.model import MLP, sample_names

DEFAULT_STEPS = 50_000  # val loss 2.145; ~1.5 min of one core with the torch path (CPU)
EVAL_CHUNK = 32_768  # examples per eval forward: bounds eval memory at ~30 MB for n_hidden 200
LOG_EVERY = 200  # steps between the all_reduces that sum the ranks' shares of the losses (data-parallel)
PROGRESS_LINES = 10  # progress lines per run, at most; each reads one loss back to the host


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


def data_parallel(model: MLP, ddp: DDPInfo) -> DistributedDataParallel:
    """`model` with its BatchNorm synchronised over every rank (fused_ops.SyncBatchNorm for the fused
    model, torch.nn.SyncBatchNorm otherwise; same tensors), wrapped in DistributedDataParallel."""
    group = dist.group.WORLD
    if model.fused:
        convert(model, process_group=group)
    else:
        nn.SyncBatchNorm.convert_sync_batchnorm(model, group)
    device_ids = [ddp.device.index] if ddp.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=group)


def train_model(
    model: torch.nn.Module,
    train: Split,
    config: TrainConfig,
    *,
    progress: bool = True,
    process_group: dist.ProcessGroup | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> torch.Tensor:
    """Run `config.steps` SGD steps on minibatches of `train`; returns the per-step losses (steps,).

    `model(X, Y)` must return (logits, loss), the loss a mean over the rows given. The losses stay on
    the device; the only host reads are the PROGRESS_LINES progress lines, each the mean training loss
    since the previous one, printed when `progress` is set.

    process_group: None for one process; else data-parallel training over that group, `model` being
    wrapped in DistributedDataParallel over it. Every rank draws the same global batch of
    `config.batch_size` indices (same generator, same seed) and trains on its `shard_slice` of them;
    the losses returned, on every rank, are the global batch's.

    optimizer: torch.optim.SGD over model's parameters at lr config.lr, or None to build it here; its
    learning rate drops to config.final_lr at config.decay_step. `main` builds it before it starts its
    clock: a process's first torch.optim optimizer imports torch._dynamo (~1.5 s on a 2-core machine),
    which is set-up, not training.
    """
    device = torch.device(config.device)
    X, Y = train.X.to(device), train.Y.to(device)
    world = 1 if process_group is None else world_size(process_group)
    if world > config.batch_size:
        raise ValueError(
            f"train_model: {world} processes for batch_size {config.batch_size}: every process needs a row"
        )
    rows = shard_slice(config.batch_size, 0 if process_group is None else rank(process_group), world)
    # The global-batch loss is sum_r share_r * loss_r, with loss_r the mean over rank r's rows.
    share = (rows.stop - rows.start) / config.batch_size
    batch_generator = torch.Generator(device=device).manual_seed(config.seed)
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    losses = torch.empty(config.steps, device=device)
    reduced = 0  # losses[:reduced] are summed over the ranks
    decay_step = config.decay_step
    model.train()
    # Progress lines at multiples of LOG_EVERY, so that the losses they average are summed over the ranks.
    report_every = LOG_EVERY * max(1, math.ceil(config.steps / (PROGRESS_LINES * LOG_EVERY)))
    reported, start = 0, time.perf_counter()
    for step in range(config.steps):
        if step == decay_step:
            for group in optimizer.param_groups:
                group["lr"] = config.final_lr
        ix = torch.randint(0, X.shape[0], (config.batch_size,), device=device, generator=batch_generator)
        ix = ix[rows]  # the global batch is drawn alike on every rank: this rank's rows of it
        _, loss = model(X[ix], Y[ix])
        optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over the ranks: sum_r grad(world * share_r * loss_r) / world is the
        # gradient of the global-batch loss.
        (loss * (world * share)).backward()
        optimizer.step()
        losses[step] = loss.detach() * share
        if (step + 1) % LOG_EVERY == 0 or step + 1 == config.steps:
            if world > 1:  # one collective per LOG_EVERY steps: sum the ranks' shares of each loss
                losses[reduced : step + 1] = all_reduce_sum(losses[reduced : step + 1], process_group)
            reduced = step + 1
            if progress and (reduced % report_every == 0 or reduced == config.steps):
                mean = losses[reported:reduced].mean().item()
                print(
                    f"step {reduced:>{len(str(config.steps))}}/{config.steps}  train loss {mean:.4f} "
                    f"(mean of steps {reported + 1}-{reduced})  {time.perf_counter() - start:.1f} s",
                    flush=True,
                )
                reported = reduced
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
        sys.exit(
            "error: --plot needs matplotlib, which is not installed: pip install 'fused_ops[plot]' (from a "
            "clone: pip install -e '.[plot]')"
        )
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
        help="torch device (default: cuda when available, else cpu); with --ddp, cpu or cuda",
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="seeds the initial weights, batches and samples (default 42)"
    )
    parser.add_argument(
        "--no-fused",
        dest="fused",
        action="store_false",
        help="use torch's own BatchNorm1d, Tanh and cross_entropy (and SyncBatchNorm, GPU only)",
    )
    parser.add_argument(
        "--ddp",
        action="store_true",
        help="data-parallel training, one process per CPU or GPU, started by torchrun: "
        "DistributedDataParallel with SyncBatchNorm over gloo (cpu) or NCCL (cuda, the GPU LOCAL_RANK), "
        "e.g. `torchrun --nproc_per_node 2 -m fused_ops train --ddp`",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="write the split losses, steps, seconds, samples and per-step training losses as JSON",
    )
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the loss curve (needs matplotlib)")


def _check_device(device: str) -> None:
    """Exit with an `error:` line unless `device` names a torch device that this torch can use."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        sys.exit(f"error: --device {device}: not a torch device; use cpu or cuda (or cuda:N)")
    if kind not in ("cpu", "cuda"):
        sys.exit(f"error: --device {device}: the makemore job runs on cpu or cuda (or cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but sees no GPU"
        sys.exit(f"error: --device {device}: torch {torch.__version__} is {why}; use --device cpu")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        sys.exit(f"error: --device {device}: {str(error).splitlines()[0]}")


def _check_output_path(option: str, path: str) -> None:
    """Exit with an `error:` line unless `path` can be written: checked before training, not after."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        sys.exit(f"error: {option} {path}: is a directory; give a file name")
    if not os.path.isdir(folder):
        sys.exit(f"error: {option} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        sys.exit(f"error: {option} {path}: not writable")


def main(args: argparse.Namespace) -> int:
    """Train, evaluate, sample and report, as the CLI's `train` command; with --ddp, as one rank."""
    if args.steps < 1:
        sys.exit(f"error: --steps must be >= 1, got {args.steps}")
    _check_device(args.device)
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            _check_output_path(option, path)
    if args.plot:
        _import_pyplot()  # fail before training, not after
    backend = os.environ.get("FUSED_OPS_BACKEND")
    if backend is not None:  # checked before anything is built
        try:
            with use_backend(backend):
                pass
        except ValueError as error:
            sys.exit(f"error: FUSED_OPS_BACKEND: {error}")
    if not args.ddp:
        return _run_or_exit(args, ddp=None)
    if not args.fused and args.device == "cpu":
        sys.exit("error: --ddp --no-fused uses torch.nn.SyncBatchNorm, which runs on GPUs only")
    try:
        ddp = setup_ddp(args.device)
    except (RuntimeError, ValueError) as error:
        sys.exit(f"error: --ddp: {error}")
    try:
        status = _run_or_exit(args, ddp)
        # Leave together: the other ranks return while rank 0 still evaluates and samples, and a rank that
        # tore down its gloo group then sometimes aborted ("terminate called without an active
        # exception", exit -6; seen under load). A rank that raised skips this, and its peers fail fast.
        dist.barrier()
        return status
    finally:
        cleanup_ddp()


def _run_or_exit(args: argparse.Namespace, ddp: DDPInfo | None) -> int:
    """`run`, with a backend that cannot run these tensors (a forced FUSED_OPS_BACKEND=triton on CPU, say)
    reported as an `error:` line; it raises at the first step, before any training."""
    try:
        return run(args, ddp)
    except BackendUnavailableError as error:
        sys.exit(f"error: {error}")


def run(args: argparse.Namespace, ddp: DDPInfo | None) -> int:
    """The job on one process (ddp None) or as one rank of a data-parallel group that is set up."""
    device = args.device if ddp is None else str(ddp.device)
    config = TrainConfig(steps=args.steps, seed=args.seed, device=device, fused=args.fused)
    data = load_dataset()
    model = build_model(config, len(data.vocab), data.block_size)
    reports = ddp is None or ddp.rank == 0  # evaluates, samples, prints and writes files
    if reports:
        print(
            f"makemore MLP ({'fused_ops' if config.fused else 'torch'} modules, "
            f"{sum(p.numel() for p in model.parameters())} parameters) on {_where(config, ddp)}: "
            f"{config.steps} steps, batch {config.batch_size}, lr {config.lr} then {config.final_lr} "
            f"from step {config.decay_step}"
        )
    trained = model if ddp is None else data_parallel(model, ddp)
    group = None if ddp is None else dist.group.WORLD
    threads = torch.get_num_threads()
    if torch.device(config.device).type == "cpu":
        # (32, 200) matmuls are too small to split: extra intra-op threads only add synchronisation, and
        # on a busy machine they spin-wait. One thread is as fast alone and far faster under load.
        torch.set_num_threads(1)
    optimizer = torch.optim.SGD(trained.parameters(), lr=config.lr)
    start = time.perf_counter()
    try:
        losses = train_model(
            trained, data.train, config, progress=reports, process_group=group, optimizer=optimizer
        )
        if torch.device(config.device).type == "cuda":
            torch.cuda.synchronize()
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    if not reports:
        return 0
    # Rank 0 alone, through the model itself: calling the DDP wrapper on one rank would wait for the others.
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
        report.update(
            steps=config.steps,
            seconds=seconds,
            world_size=1 if ddp is None else ddp.world_size,
            samples=samples,
            losses=losses.tolist(),  # the training loss of every step, of the global batch
        )
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        save_loss_plot(losses, args.plot)
    return 0


def _where(config: TrainConfig, ddp: DDPInfo | None) -> str:
    """Where the job runs: "cpu", or e.g.
    "cpu, data-parallel over 3 processes (gloo; 11+11+10 rows of each batch)"."""
    if ddp is None:
        return config.device
    shards = [shard_slice(config.batch_size, r, ddp.world_size) for r in range(ddp.world_size)]
    rows = "+".join(str(s.stop - s.start) for s in shards)
    return (
        f"{ddp.device.type}, data-parallel over {ddp.world_size} process{'es' if ddp.world_size > 1 else ''} "
        f"({dist.get_backend()}; {rows} rows of each batch)"
    )
