"""One rank of a gloo group for tests/test_distributed.py (a script, not collected by pytest).

    python tests/dist_worker.py RANK WORLD_SIZE PORT WORKDIR

Joins a gloo group on tcp://127.0.0.1:PORT, runs every case of WORKDIR/cases.pt in order on this
rank's share of the inputs (on the ranks of its subgroup, if it names one), and saves what it
observed to WORKDIR/rank<RANK>.pt. All checks happen in the test process, against single-process
references on the full inputs.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
import traceback
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fused_ops.backend import use_backend
from fused_ops.convert import convert
from fused_ops.cross_entropy import CrossEntropyLoss, cross_entropy
from fused_ops.distributed.sync_batch_norm import SyncBatchNorm
from fused_ops.distributed.vocab_parallel import vocab_parallel_cross_entropy
from fused_ops.linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy

CASE_TIMEOUT = datetime.timedelta(seconds=20)  # each collective of a case's own group

# Counted so the tests can assert how many collectives each op issues (and that eval issues none).
COLLECTIVES = ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor")


@contextlib.contextmanager
def count_collectives():
    """Count the torch.distributed collectives called inside the block (by name)."""
    counts = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def rows_of(counts: list[int], rank: int) -> slice:
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def _layout(t: torch.Tensor, case: dict) -> torch.Tensor:
    """t in the case's memory format ("channels_last", ...; default contiguous)."""
    return t.contiguous(memory_format=getattr(torch, case.get("memory_format", "contiguous_format")))


def _leaf(t: torch.Tensor | None, case: dict) -> torch.Tensor | None:
    return None if t is None else _layout(t.clone(), case).requires_grad_()


def run_batch_norm(case: dict, rank: int, world_size: int, group) -> dict:
    """Train steps on this rank's rows of each global batch, then an eval step; record everything."""
    bn = SyncBatchNorm(**case["module"], dtype=case["dtype"], process_group=group)
    bn.load_state_dict(case["state"])
    observed = {"train": [], "eval": None}
    fmt = getattr(torch, case.get("memory_format", "contiguous_format"))
    for x_full, dy_full, counts, res_full in case["steps"]:
        rows = rows_of(counts, rank)
        x = _leaf(x_full[rows], case)
        res = _leaf(None if res_full is None else res_full[rows], case)
        with count_collectives() as forward_calls:
            y = bn(x, residual=res)
        with count_collectives() as backward_calls:
            y.backward(dy_full[rows])
        observed["train"].append(
            {
                "y": y.detach(),
                "layout_kept": y.is_contiguous(memory_format=fmt),
                "dx": x.grad,
                "dresidual": None if res is None else res.grad,
                "dweight": None if bn.weight is None else bn.weight.grad.clone(),
                "dbias": None if bn.bias is None else bn.bias.grad.clone(),
                "state": {k: v.clone() for k, v in bn.state_dict().items()},
                "forward_calls": dict(forward_calls),
                "backward_calls": dict(backward_calls),
            }
        )
        bn.zero_grad(set_to_none=True)
    bn.eval()
    x_full, dy_full, counts, res_full = case["eval"]
    rows = rows_of(counts, rank)
    x = _leaf(x_full[rows], case)
    res = _leaf(None if res_full is None else res_full[rows], case)
    with count_collectives() as calls:
        y = bn(x, residual=res)
        y.backward(dy_full[rows])
    observed["eval"] = {
        "y": y.detach(),
        "dx": x.grad,
        "dresidual": None if res is None else res.grad,
        "calls": dict(calls),
        "state": {k: v.clone() for k, v in bn.state_dict().items()},
    }
    return observed


def run_bad_input(case: dict, rank: int, world_size: int, group) -> dict:
    """A bad input raises before any collective and leaves the state intact; the group then carries on."""
    bn = SyncBatchNorm(**case["module"], process_group=group)
    bn.load_state_dict(case["state"])
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    errors = []
    with count_collectives() as calls:
        for bad in case["bad_inputs"]:  # an input, or (input, residual)
            try:
                bn(*bad) if isinstance(bad, tuple) else bn(bad)
            except (TypeError, ValueError) as error:
                errors.append(f"{type(error).__name__}: {error}")
    unchanged = all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
    good = bn(case["good_input"][rows_of(case["counts"], rank)])  # would hang if the ranks fell out of step
    return {"errors": errors, "calls": dict(calls), "unchanged": unchanged, "good": good.detach()}


def _sharded_cross_entropy(api: str, logits, target, weight, group, **options) -> torch.Tensor:
    """The sharded loss through one of the three public entry points."""
    if api == "vocab_parallel":
        return vocab_parallel_cross_entropy(logits, target, group, weight=weight, **options)
    if api == "cross_entropy":
        return cross_entropy(logits, target, weight, process_group=group, **options)
    return CrossEntropyLoss(weight, process_group=group, **options)(logits, target)  # the module


def run_cross_entropy(case: dict, rank: int, world_size: int, group) -> dict:
    """Each option on this rank's class slice: loss and the gradient slice, plus collective counts."""
    width = case["widths"][rank]
    offset = sum(case["widths"][:rank])
    observed = []
    for option in case["options"]:
        logits = case["logits"].narrow(1, offset, width).clone().requires_grad_()
        weight = None if option["weight"] is None else option["weight"][offset : offset + width]
        with count_collectives() as forward_calls:
            loss = _sharded_cross_entropy(
                case.get("api", "vocab_parallel"),
                logits,
                option.get("target", case["target"]),
                weight,
                group,
                ignore_index=option["ignore_index"],
                reduction=option["reduction"],
                label_smoothing=option["label_smoothing"],
            )
        with count_collectives() as backward_calls:
            loss.backward(option["grad"])
        observed.append(
            {
                "loss": loss.detach(),
                "dlogits": logits.grad,
                "forward_calls": dict(forward_calls),
                "backward_calls": dict(backward_calls),
            }
        )
    return observed


def run_ddp_step(case: dict, rank: int, world_size: int, group) -> dict:
    """One DDP step of Linear -> BatchNorm1d -> Tanh -> Linear, converted to fused ops with SyncBatchNorm,
    on the mean loss of the global batch."""
    model = nn.Sequential(
        nn.Linear(*case["sizes"][:2]),
        nn.BatchNorm1d(case["sizes"][1]),
        nn.Tanh(),
        nn.Linear(*case["sizes"][1:]),
    ).to(case["x"].dtype)
    model.load_state_dict(case["state"])
    model = convert(model, process_group=group)  # BatchNorm1d + Tanh -> SyncBatchNorm(tanh)
    ddp = DistributedDataParallel(model, process_group=group)
    rows = rows_of(case["counts"], rank)
    logits = ddp(case["x"][rows])
    # DDP averages gradients over the ranks: scale the local sum so the average is the global mean.
    loss = F.cross_entropy(logits, case["target"][rows], reduction="sum") * (world_size / sum(case["counts"]))
    loss.backward()
    return {
        "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [type(m).__name__ for m in model],
    }


def run_linear_cross_entropy(case: dict, rank: int, world_size: int, group) -> dict:
    """Vocab-parallel linear + cross-entropy on this rank's rows of the head: the loss, the full dX and
    this rank's slices of dW, db, plus collective counts; through the function or the module."""
    width = case["widths"][rank]
    rows = slice(sum(case["widths"][:rank]), sum(case["widths"][: rank + 1]))
    observed = []
    for option in case["options"]:
        x = case["x"].clone().requires_grad_()
        weight = None if option["weight"] is None else option["weight"][rows]
        kwargs = {
            "reduction": option["reduction"],
            "label_smoothing": option["label_smoothing"],
            "chunk_size": case["chunk_size"],
        }
        if case.get("api") == "module":
            head = LinearCrossEntropyLoss(
                x.shape[-1], width, bias=True, dtype=x.dtype, weight=weight, process_group=group, **kwargs
            )
            head.load_state_dict(
                {"linear.weight": case["w"][rows], "linear.bias": case["b"][rows]}, strict=False
            )
            w, b = head.linear.weight, head.linear.bias
        else:
            w, b = case["w"][rows].clone().requires_grad_(), case["b"][rows].clone().requires_grad_()

            def head(x, target, w=w, b=b, weight=weight, kwargs=kwargs):
                return linear_cross_entropy(
                    x, w, target, linear_bias=b, weight=weight, process_group=group, **kwargs
                )

        with count_collectives() as forward_calls:
            loss = head(x, case["target"])
        with count_collectives() as backward_calls:
            loss.backward(option["grad"])
        observed.append(
            {
                "loss": loss.detach(),
                "dx": x.grad,
                "dw": w.grad,
                "db": b.grad,
                "forward_calls": dict(forward_calls),
                "backward_calls": dict(backward_calls),
            }
        )
    return observed


def run_lce_data_parallel(case: dict, rank: int, world_size: int, group) -> dict:
    """LinearCrossEntropyLoss under DDP or FSDP2 (fully_shard) on this rank's rows of the batch: each
    rank's sum over its rows, scaled so that the ranks' average is the global sum over N."""
    head = LinearCrossEntropyLoss(*case["sizes"], bias=True, dtype=torch.float64, reduction="sum")
    head.load_state_dict(case["state"])
    if case["wrap"] == "ddp":
        model = DistributedDataParallel(head, process_group=group)
    else:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(head, mesh=DeviceMesh.from_group(group, "cpu"))
    rows = rows_of(case["counts"], rank)
    loss = model(case["x"][rows], case["target"][rows]) * (world_size / sum(case["counts"]))
    loss.backward()
    grads = {}
    for name, p in head.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2: a DTensor shard
        grads[name] = grad.clone()
    return {"grads": grads, "sharded": [type(p).__name__ for p in head.parameters()]}


RUNNERS = {
    "batch_norm": run_batch_norm,
    "bad_input": run_bad_input,
    "cross_entropy": run_cross_entropy,
    "ddp_step": run_ddp_step,
    "linear_cross_entropy": run_linear_cross_entropy,
    "lce_data_parallel": run_lce_data_parallel,
}


def main(rank: int, world_size: int, port: int, workdir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),  # start-up included
    )
    try:
        cases = torch.load(f"{workdir}/cases.pt", weights_only=False)
        # case["group"]: "default" -> process_group=None; "WORLD" -> dist.group.WORLD; a list of ranks -> a
        # new group of those; absent -> a new group of all ranks. A case on a group of its own is isolated:
        # if it raises on one rank while its peers wait in a collective, they time out (CASE_TIMEOUT) and
        # every later case still pairs its collectives correctly. Every rank creates every group, in order.
        groups = {}
        for name, case in cases.items():
            spec = case.get("group", list(range(world_size)))
            if isinstance(spec, list):
                groups[name] = (spec, dist.new_group(spec, timeout=CASE_TIMEOUT))
            else:
                groups[name] = (list(range(world_size)), {"default": None, "WORLD": dist.group.WORLD}[spec])
        results = {}
        for name, case in cases.items():
            members, group = groups[name]
            if rank not in members:
                continue
            try:
                with use_backend(case.get("backend", "auto")):
                    results[name] = RUNNERS[case["kind"]](case, members.index(rank), len(members), group)
            except Exception:  # noqa: BLE001  (reported by that case's test; the other cases still run)
                results[name] = {"error": traceback.format_exc()}
        torch.save(results, f"{workdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
