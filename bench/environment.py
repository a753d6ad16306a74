"""Where and when the numbers were taken: device name, versions, date, load."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from dataclasses import dataclass

import torch


@dataclass
class Environment:
    device: str  # "cuda" | "cpu"
    device_name: str
    torch_version: str
    triton_version: str
    liger_version: str
    python_version: str
    date: str
    threads: int
    load_start: tuple[float, float, float] | None
    load_end: tuple[float, float, float] | None = None
    copy_gbps: float = 0.0
    command: str = ""
    wall_s: float = 0.0

    def header_lines(self) -> list[str]:
        lines = [
            f"device: {self.device_name}",
            (
                f"torch {self.torch_version}, triton {self.triton_version}, "
                f"Liger-Kernel {self.liger_version}, Python {self.python_version}; "
                f"torch CPU threads: {self.threads}"
            ),
            f"date: {self.date}",
            f"copy bandwidth (dst.copy_(src), read + write): {self.copy_gbps:.1f} GB/s",
        ]
        if self.load_start is not None:
            end = "" if self.load_end is None else f", at the end {_load(self.load_end)}"
            lines.append(
                f"load average (1/5/15 min) at the start {_load(self.load_start)}{end}, "
                f"{os.cpu_count()} logical CPUs"
            )
        return lines


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in load)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
            )
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def capture(device: torch.device, command: str) -> Environment:
    return Environment(
        device=device.type,
        device_name=device_name(device),
        torch_version=torch.__version__,
        triton_version=_version("triton"),
        liger_version=_version("liger-kernel"),
        python_version=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        threads=torch.get_num_threads(),
        load_start=load_average(),
        command=command,
    )
