"""bench/gpu_check.sh cannot rot: its dry run (no CUDA device) runs every step, in order, within its budget.

GPU steps report "skipped: no CUDA device"; the steps a CPU can do run for real (preflight, the
collection of the kernel test files, the real-shape check at tiny shapes).  $OUT gets at most 8 files.
"""

import csv
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.sh")

# Steps that need a CUDA device (test:<file> steps are checked separately).
GPU_STEPS = ["install", "build", "memcheck", "bench:scan", "bench:gramians", "bench:train", "bench:decode", "tests:rest"]
CPU_STEPS = ["collect", "realshape-tiny"]


@pytest.mark.skipif(bool(os.environ.get("COMPRESSM_GPU_CHECK")), reason="running inside bench/gpu_check.sh itself")
@pytest.mark.slow  # the whole script: preflight, collection, tiny real-shape check
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    files = sorted(os.listdir(out))
    assert files == ["gpu_check.log", "results.tar", "steps.tsv"], files  # at most 8 come back from a GPU machine
    with open(out / "steps.tsv") as f:
        steps = {row["step"]: row["status"] for row in csv.DictReader(f, delimiter="\t")}
    order = list(steps)
    assert order[0] == "preflight" and order[-1] == "total", order
    # "ok, required missing" where e.g. triton is absent (CI's bare venv): the preflight names it and goes on
    assert steps["preflight"].startswith("ok"), steps["preflight"]
    for name in CPU_STEPS:
        assert steps.get(name) == "ok", (name, steps.get(name), proc.stdout[-3000:])
    for name in GPU_STEPS:
        assert steps.get(name) == "skipped: no CUDA device", (name, steps.get(name))
    test_steps = [s for s in order if s.startswith("test:")]
    expected_files = sorted(f"test:tests/ops/{f}" for f in os.listdir(os.path.join(REPO, "tests", "ops"))
                            if f.startswith("test_") and f.endswith(".py") and f != "test_cuda_compile.py")
    assert sorted(test_steps) == expected_files
    assert all(steps[s] == "skipped: no CUDA device" for s in test_steps)
    # the kernel tests before the build only where they do not need the extension; the CUDA ones after it
    assert all(order.index(s) > order.index("build") for s in test_steps if "cuda" in s)
    assert order.index("build") < order.index("realshape-tiny") < order.index("memcheck") < order.index("bench:scan")
    assert steps["total"] == "0 failed"

    with tarfile.open(out / "results.tar") as tar:
        names = tar.getnames()
        assert {"preflight.txt", "collect.log", "realshape-tiny.log", "realshape.csv"} <= set(names), names
        preflight = tar.extractfile("preflight.txt").read().decode()
        rows = list(csv.DictReader(tar.extractfile("realshape.csv").read().decode().splitlines()))
    assert "torch" in preflight and "transformers tested range" in preflight
    checked = [r for r in rows if r["backend"] == "torch" and r["status"] == "ok"]
    # every dtype, forward and every gradient, for the scan; P and Q for both Gramian estimators
    assert {r["dtype"] for r in checked} == {"fp32", "fp16", "bf16"}
    assert {r["quantity"] for r in checked if r["op"] == "selective_scan"} >= {"out", "du", "ddelta", "dB", "dC"}
    assert {r["op"] for r in checked} >= {"selective_scan", "gramian_sums/frozen", "gramian_sums/ltv"}
    assert not [r for r in rows if r["status"].startswith("FAIL")]
    log = (out / "gpu_check.log").read_text()
    assert log.count("skipped: no CUDA device") >= len(GPU_STEPS)


@pytest.mark.slow  # a bash script with fresh Python processes
def test_gpu_anchor_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_anchor.sh")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped: no CUDA device" in (tmp_path / "anchor.log").read_text()


def test_realshape_check_fails_a_wrong_kernel(monkeypatch):
    """The real-shape check can fail: a scan 1% off in its output, or with a wrong gradient, is caught."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "bench"))
    import gpu_realshape_check as check

    real = check.ops.selective_scan

    def off_by_one_percent(*args, **kwargs):
        return real(*args, **kwargs) * 1.01

    def wrong_gradient(u, *args, **kwargs):
        return real(u.detach() + 0 * u, *args, **kwargs)  # same output, du comes back zero

    tiny, cpu = dict(check.TINY), torch.device("cpu")
    rows = check.check_scan(tiny, 12, "fp32", cpu, ["torch"])
    assert rows and all(r["status"] == "ok" for r in rows)
    monkeypatch.setattr(check.ops, "selective_scan", off_by_one_percent)
    rows = {r["quantity"]: r["status"] for r in check.check_scan(tiny, 12, "fp32", cpu, ["torch"])}
    assert rows["out"] == "FAIL"
    monkeypatch.setattr(check.ops, "selective_scan", wrong_gradient)
    rows = {r["quantity"]: r["status"] for r in check.check_scan(tiny, 12, "fp32", cpu, ["torch"])}
    assert rows["out"] == "ok" and rows["du"] == "FAIL"
