"""Shared benchmark plumbing: timing, environment description, correctness gates, CSV rows.

Benchmarks are scripts, not tests (HOUSE_STYLE rule 8): warmed up, median of several runs, each
speed claim a ratio measured side by side in one run, rows appended to bench/results/*.csv with the
device, versions and git sha.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of fn() in milliseconds, after warm-up runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(RESULTS))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    """Columns every result row carries."""
    versions = {"torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = "-"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "device": device_name(device),
        "git": git_sha(),
        **versions,
    }


def copy_bandwidth_gbs(device: torch.device, megabytes: int = 256) -> float:
    """Measured device copy bandwidth (read + write), the peak the kernels' GB/s are compared with."""
    n = megabytes * (1 << 20) // 4
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def gate(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> float:
    """Correctness gate: refuse to time a kernel whose result is wrong."""
    err = max_rel_error(actual, expected)
    if not err <= tol:
        raise SystemExit(f"correctness gate failed for {name}: max relative error {err:.2e} > {tol:.0e}")
    return err


def append_rows(filename: str, rows: list) -> str:
    """Append dict rows to bench/results/<filename>, writing the header for a new file."""
    if not rows:
        return ""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, filename)
    fields = list(rows[0].keys())
    new = not os.path.exists(path)
    if not new:
        with open(path) as f:
            header = next(csv.reader(f), None)
        if header and header != fields:
            raise SystemExit(f"{path} has columns {header}; these rows have {fields}: use another file")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def csv_sink(filename: str, env: dict, enabled: bool = True):
    """A function appending one row (after the ``env`` columns) to bench/results/<filename> as soon as
    it is measured, so that a run cut short by a timeout keeps what it measured."""

    def add(row: dict) -> None:
        if enabled:
            append_rows(filename, [{**env, **row}])

    return add


def print_table(rows: list, columns: list) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)))
