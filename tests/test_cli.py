"""Smoke tests of `python -m fused_ops train|parity` and the `fused-ops` console script, in subprocesses."""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fused_ops.__main__ import main

ROWS_PER_REPORT = 13 + 14 + 13  # manual, fused (+ loss), fused with tanh (+ loss, no hpreact)


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_train_writes_json_and_png(tmp_path):
    json_path, png_path = tmp_path / "run.json", tmp_path / "loss.png"
    result = run(
        sys.executable, "-m", "fused_ops", "train", "--steps", "200", "--device", "cpu",
        "--json", str(json_path), "--plot", str(png_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(json_path.read_text())
    assert set(report) == {"train_loss", "val_loss", "test_loss", "steps", "seconds", "world_size", "samples",
                           "losses"}  # fmt: skip
    assert report["steps"] == 200 and report["seconds"] > 0 and report["world_size"] == 1
    assert len(report["losses"]) == 200 and report["losses"][-1] < report["losses"][0] - 0.3
    for split in ("train", "val", "test"):
        assert 2.0 < report[f"{split}_loss"] < 3.0  # learnt something in 200 steps: log(27) = 3.30
        assert f"{split} loss {report[f'{split}_loss']:.4f}" in result.stdout
    assert len(report["samples"]) == 20 and all(isinstance(name, str) for name in report["samples"])
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fused_ops modules" in result.stdout


def parse_rows(stdout: str) -> list[list[str]]:
    rows = [
        [cell.strip() for cell in line.split("|")] for line in stdout.splitlines() if line.count("|") == 3
    ]
    return [row for row in rows if row[0] != "name"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parity_command(dtype):
    result = run(sys.executable, "-m", "fused_ops", "parity", "--dtype", dtype)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = parse_rows(result.stdout)
    assert len(rows) == ROWS_PER_REPORT
    names = {"C", "W1", "b1", "W2", "b2", "bngain", "bnbias", "emb", "embcat", "hprebn", "hpreact", "h"}
    assert {row[0] for row in rows} >= names | {"logits", "loss"}
    assert all(row[2] == "True" for row in rows)
    tolerance = 1e-7 if dtype == "float32" else 1e-15
    # the loss (~3.3) within 2 ulp: the native kernel sums the rows' losses in float64, torch in float32
    loss_tolerance = 2 * 4 * torch.finfo(getattr(torch, dtype)).eps
    assert all(float(row[3]) < (tolerance if row[0] != "loss" else loss_tolerance) for row in rows)
    assert f"OK: all {ROWS_PER_REPORT} rows approximately equal" in result.stdout


def test_console_script_is_installed():
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "fused-ops"]
    assert entry.value == "fused_ops.__main__:main"
    script = shutil.which("fused-ops")
    assert script is not None, "fused-ops is not on PATH: install the package (pip install -e .)"
    result = run(script, "train", "--help")
    assert result.returncode == 0 and "--no-fused" in result.stdout


def test_plot_without_matplotlib_fails_before_training(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit, match=r"--plot needs matplotlib.*fused_ops\[plot\]"):
        main(["train", "--steps", "5", "--plot", os.devnull])
    assert "makemore MLP" not in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["train", "--steps", "0"], ["parity", "--dtype", "float16"]])
def test_bad_arguments_exit_with_an_error(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code != 0


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_unwritable_output_path_fails_before_training(option, tmp_path, capsys):
    missing = tmp_path / "missing" / "out.file"
    with pytest.raises(SystemExit, match=rf"^error: {option} .*missing.* does not exist"):
        main(["train", "--steps", "5", option, str(missing)])
    with pytest.raises(SystemExit, match=rf"^error: {option} .*is a directory"):
        main(["train", "--steps", "5", option, str(tmp_path)])
    assert "makemore MLP" not in capsys.readouterr().out  # nothing trained


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "not a torch device"), ("cuda", "CPU-only build|sees no GPU")],
)
def test_unusable_device_is_an_error_line(device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run(sys.executable, "-m", "fused_ops", "train", "--steps", "5", "--device", device)
    assert result.returncode == 1
    assert re.match(rf"error: --device {device}: .*({message})", result.stderr), result.stderr
    assert "Traceback" not in result.stderr and "makemore MLP" not in result.stdout


@pytest.mark.parametrize(
    "env, argv, message",
    [
        ({"FUSED_OPS_BACKEND": "gpu"}, [], r"error: FUSED_OPS_BACKEND: backend name must be one of"),
        ({"FUSED_OPS_BACKEND": "triton", "TRITON_INTERPRET": "0"}, [], r"error: batch_norm: backend 'triton'"),
        ({}, ["--device", "meta"], r"error: --device meta: the makemore job runs on cpu or cuda"),
    ],
    ids=["unknown_backend", "forced_triton_on_cpu", "meta_device"],
)
def test_backend_and_device_faults_are_error_lines(env, argv, message):
    """Found by a new user's trial: these ended in raw tracebacks (the messages were right)."""
    if env.get("FUSED_OPS_BACKEND") == "triton" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: triton can run")
    result = subprocess.run(
        [sys.executable, "-m", "fused_ops", "train", "--steps", "5", *argv],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
