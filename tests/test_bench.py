"""CPU smoke run of the benchmark harness (tiny shapes, 3 reps), so that `python -m bench` cannot rot.

Also checks the parts whose numbers the results rest on: the byte models, the CPU peak-memory and
operator-count methods, the timer, and that rewriting one device's section of RESULTS.md keeps the rest.
"""

import csv
import sys
import time

import pytest
import torch

from bench import cnn, ops, report
from bench.__main__ import main
from bench.ops import Case, Timed
from bench.profiling import observe
from bench.sweep import Settings, parse_shapes, plan, run
from bench.timing import measure

SMOKE_PROVIDERS = ("fused", "eager", "unfused", "liger")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One quick sweep of every op and mode (no torch.compile: tens of seconds per case on a CPU)."""
    out = tmp_path_factory.mktemp("bench")
    results = out / "RESULTS.md"
    code = main(
        [
            "--device",
            "cpu",
            "--quick",
            "--provider",
            ",".join(SMOKE_PROVIDERS),
            "--out",
            str(out),
            "--results",
            str(results),
            "--no-progress",
        ]
    )
    with open(out / "results_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return code, rows, out, results


def test_smoke_run_measures_every_op_mode_and_provider(smoke):
    code, rows, _, _ = smoke
    assert code == 0, [r["note"] for r in rows if r["status"] == "error"]
    measured = {(r["op"], r["mode"], r["provider"]) for r in rows if r["status"] == "ok"}
    for op in ops.OPS:
        for provider in ops.OP_PROVIDERS[op]:
            if provider in ("liger", "compile"):
                continue
            for mode in ops.OP_MODES[op]:
                assert (op, mode, provider) in measured, (op, mode, provider)
    for r in rows:
        if r["status"] != "ok":
            continue
        median, p20, p80 = float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= median <= p80, r
        assert float(r["peak_mem_mib"]) >= 0 and int(r["launches"]) >= 1, r
        if ops.OP_MODES[r["op"]] == ("step",):  # a training step: no byte model
            assert r["gbps"] == "" and r["bytes"] == "", r
        else:  # GB/s is the byte model over the median, and % copy is against a positive bandwidth
            assert float(r["gbps"]) == pytest.approx(int(r["bytes"]) / (median * 1e-3) / 1e9, rel=1e-6), r
            assert float(r["pct_copy_bw"]) > 0, r


def test_liger_row_says_why_it_did_not_run_on_cpu(smoke):
    _, rows, _, _ = smoke
    liger = [r for r in rows if r["provider"] == "liger"]
    assert liger and all(r["op"] == "ce" for r in liger)
    assert all(r["status"] == "unavailable" for r in liger)
    assert all(r["note"].startswith(("not installed", "needs CUDA")) for r in liger)


def test_smoke_run_writes_table_plots_and_results(smoke):
    _, _, out, results = smoke
    assert (out / "table_cpu.txt").read_text().startswith("op ")
    for op in ("ce", "bn", "bn_tanh"):
        for dtype in ("fp32", "bf16"):
            png = out / "plots_cpu" / f"{op}_{dtype}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = results.read_text()
    assert text.count("<!-- bench:cpu:begin -->") == 1 and "<!-- bench:cpu:end -->" in text
    assert f"torch {torch.__version__}" in text
    titles = ("cross-entropy", "BatchNorm (training)", "BatchNorm + tanh", "makemore")
    for title in (*titles, "BatchNorm2d (training)", "BatchNorm2d + add + ReLU", "ResNet basic-block"):
        assert f"### {title}" in text
    assert (results.parent / "results" / "cpu" / "ce_fp32.png").exists()
    assert "](results/cpu/ce_fp32.png)" in text


def test_compile_provider_runs(tmp_path):
    """torch.compile of the eager code, on one small case and one mode (compiling costs ~10 s here)."""
    code = main(
        [
            "--device",
            "cpu",
            "--op",
            "bn",
            "--mode",
            "fwd",
            "--provider",
            "compile",
            "--dtype",
            "fp32",
            "--shapes",
            "32x64",
            "--compile-shapes",
            "all",
            "--reps",
            "3",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    with open(tmp_path / "results_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert code == 0 and len(rows) == 1 and rows[0]["status"] == "ok", rows


def test_update_results_rewrites_only_its_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    report.update_results(path, "cpu numbers v1\n", "cpu")
    report.update_results(path, "gpu numbers\n", "cuda")
    report.update_results(path, "cpu numbers v2\n", "cpu")
    text = path.read_text()
    assert text.startswith("# Benchmark results")
    assert "cpu numbers v2" in text and "cpu numbers v1" not in text and "gpu numbers" in text
    assert text.index("cpu numbers v2") < text.index("gpu numbers")


@pytest.mark.parametrize("dtype, b", [("fp32", 4), ("bf16", 2)])
def test_byte_models(dtype, b):
    n, c = 4096, 32000
    ce, bn, tanh = Case("ce", (n, c), dtype), Case("bn", (n, c), dtype), Case("bn_tanh", (n, c), dtype)
    assert ops.bytes_moved(ce, "fwd") == n * c * b + 8 * n
    assert ops.bytes_moved(ce, "fwd+bwd") == 2 * n * c * b + 8 * n
    assert ops.bytes_moved(bn, "fwd") == ops.bytes_moved(tanh, "fwd") == 2 * n * c * b
    assert ops.bytes_moved(bn, "bwd") == 3 * n * c * b
    assert ops.bytes_moved(bn, "fwd+bwd") == 5 * n * c * b
    assert ops.bytes_moved(tanh, "bwd") == 4 * n * c * b  # x and the saved y are both read
    assert ops.bytes_moved(tanh, "fwd+bwd") == 6 * n * c * b
    assert ops.bytes_moved(Case("makemore", "notebook", "fp32"), "step") is None


@pytest.mark.parametrize("dtype, b", [("fp32", 4), ("bf16", 2)])
def test_cnn_byte_models(dtype, b, monkeypatch):
    """BatchNorm2d and BatchNorm2d + add + ReLU: the L2-resident models (2 / 3 passes, 3 / 5 with the
    residual), and the re-read ones where x (and dy, y) exceed the L2 of a (pretend) GPU."""
    n, c, h, w = 256, 64, 56, 56
    e = n * c * h * w
    bn, fused = (Case(op, cnn.Shape(n, c, h, w, "nhwc"), dtype) for op in ("bn2d", "bn2d_add_relu"))
    assert [ops.bytes_moved(bn, m) for m in ("fwd", "bwd", "fwd+bwd")] == [2 * e * b, 3 * e * b, 5 * e * b]
    assert [ops.bytes_moved(fused, m) for m in ("fwd", "bwd", "fwd+bwd")] == [3 * e * b, 5 * e * b, 8 * e * b]
    assert ops.byte_model(bn, "fwd") == "byte model: fwd 2-pass (L2-resident)"
    pytest.importorskip("triton")
    monkeypatch.setitem(cnn._L2_BYTES, "cuda", 50 * 2**20)  # x of (256, 64, 56, 56) is 103 MB / 205 MB
    assert [ops.bytes_moved(bn, m) for m in ("fwd", "bwd", "fwd+bwd")] == [3 * e * b, 5 * e * b, 8 * e * b]
    assert [ops.bytes_moved(fused, m) for m in ("fwd", "bwd")] == [4 * e * b, 8 * e * b]
    assert ops.byte_model(bn, "fwd+bwd") == "byte model: fwd 3-pass (x > L2), bwd 5-pass (x > L2)"
    small = Case("bn2d", cnn.Shape(2, 8, 4, 4, "nchw"), dtype)  # on chip: x is read once
    assert ops.bytes_moved(small, "fwd") == 2 * 2 * 8 * 4 * 4 * b
    assert ops.bytes_moved(Case("resnet_block", cnn.Shape(2, 8, 6, 6, "nhwc"), dtype), "step") is None


def test_cpu_peak_memory_counts_transient_tensors():
    """Two live tensors of 1 MiB and 2 MiB, then a 4 MiB one after both are freed: the peak is 4 MiB,
    and the 8-byte scalar that survives the call is counted as allocated."""

    def fn():
        a = torch.empty(2**18)  # 1 MiB
        b = torch.empty(2**19)  # 2 MiB
        del a, b
        c = torch.empty(2**20)  # 4 MiB
        return c.sum()

    peak, launches = observe(fn, torch.device("cpu"), prepare=lambda: None)
    assert peak == pytest.approx(4 * 2**20, abs=1024)
    assert launches == 4  # empty, empty, empty, sum: top-level aten ops


def test_cpu_launch_count_ignores_nested_ops():
    x = torch.randn(64, 64)
    _, launches = observe(
        lambda: torch.nn.functional.cross_entropy(x, torch.zeros(64, dtype=torch.long)),
        torch.device("cpu"),
        prepare=lambda: None,
    )
    assert launches == 2  # zeros and cross_entropy_loss; log_softmax and nll_loss run inside the latter


def test_cpu_timer_measures_a_known_duration():
    timing = measure(Timed(lambda: time.sleep(0.002)), torch.device("cpu"), reps=5)
    assert 1.9 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert timing.median_ms < 50  # generous: the CI machine is shared


def test_cpu_timer_excludes_setup():
    timed = Timed(lambda: time.sleep(0.001), setup=lambda: time.sleep(0.02))
    timing = measure(timed, torch.device("cpu"), reps=3)
    assert 0.9 <= timing.median_ms < 15


def test_cpu_timer_batches_short_calls_after_a_slow_first_call():
    """A first call that carries a one-time cost (the native kernels' library load, ~0.2 s) must not be
    taken as the estimate: the short calls after it are batched to CPU_MIN_SAMPLE_S samples, not timed
    one per sample (timer noise made such rows bimodal and up to 1.5x too slow)."""
    calls = []

    def fn():
        calls.append(None)
        time.sleep(0.2 if len(calls) == 1 else 1e-5)

    measure(Timed(fn), torch.device("cpu"), reps=3)
    assert len(calls) > 2 + 3 * 5  # two estimates, then 3 samples of several calls each


def test_parse_shapes():
    cpu = torch.device("cpu")
    images = (cnn.Shape(8, 64, 28, 28, "nchw"), cnn.Shape(8, 64, 28, 28, "nhwc"))
    assert parse_shapes("32x27,notebook,8x64x28x28", cpu) == {
        "ce": ((32, 27),),
        "bn": ((32, 27),),
        "bn_tanh": ((32, 27),),
        "makemore": ("notebook",),
        "bn2d": images,
        "bn2d_add_relu": images,
        "resnet_block": images,
    }
    assert parse_shapes("auto", cpu)["ce"] == parse_shapes("cpu", cpu)["ce"]
    with pytest.raises(ValueError, match="--shapes: '4096by2'"):
        parse_shapes("4096by2", cpu)


def test_too_large_cases_and_an_exhausted_time_budget_leave_rows_that_say_why():
    cpu = torch.device("cpu")
    huge = plan(Settings(device=cpu, ops=("ce",), providers=("eager",), shapes="16384x128256000"))
    assert huge and all("too large for this machine" in job.skip for job in huge)
    settings = Settings(
        device=cpu, ops=("bn",), providers=("eager",), shapes="32x64", time_budget_s=0.0, progress=False
    )
    rows = run(plan(settings), settings, copy_gbps=1.0)
    assert len(rows) == 6 and all(r.status == "skipped" and "time budget" in r.note for r in rows)


def test_linear_cross_entropy_bench_smoke(tmp_path):
    """`python -m bench.linear_cross_entropy --quick`: every provider gets a row (Liger says why not on
    CPU), the ratios are to eager, TFLOP/s is 6*N*H*V over the CPU time, and the CSV and table are written."""
    from bench import linear_cross_entropy as lce

    providers = "fused,eager,torch_chunked,liger,matmul"
    code = lce.main(["--device", "cpu", "--quick", "--providers", providers, "--out", str(tmp_path)])
    with open(tmp_path / "linear_cross_entropy_cpu.csv", newline="") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert code == 0 and list(rows) == providers.split(",")
    assert rows["liger"]["status"] == "unavailable"
    assert float(rows["eager"]["vs_eager_time"]) == 1.0
    for name in ("fused", "eager", "matmul") + (
        ("torch_chunked",) if hasattr(torch.nn.functional, "linear_cross_entropy") else ()
    ):
        r = rows[name]
        assert r["status"] == "ok", r
        assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), r
        seconds = float(r["cpu_ms"]) * 1e-3  # one torch thread: the thread's CPU time
        assert float(r["tflops"]) == pytest.approx(6 * 64 * 16 * 100 / seconds / 1e12)
    assert float(rows["fused"]["peak_mib"]) > float(rows["fused"]["extra_mib"])  # less x.grad and W.grad
    assert "| fused |" in (tmp_path / "linear_cross_entropy_cpu.md").read_text()


def test_quick_run_without_matplotlib_skips_the_plots(tmp_path, monkeypatch, capsys):
    """A fresh `pip install -e .` has no matplotlib (the "plot" extra): `--quick` printed its table, then
    died on `import matplotlib` with a traceback (found by a new user's trial). It now says how to get
    the plots and exits 0."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    args = ["--device", "cpu", "--quick", "--op", "ce", "--mode", "fwd", "--dtype", "fp32"]
    code = main([*args, "--provider", "fused", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    assert "plots: skipped, matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "results_cpu.csv").exists() and not (tmp_path / "plots_cpu").exists()
