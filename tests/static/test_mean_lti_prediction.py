"""The mean_lti collection pass's kernel as bench/static_report.py models it (sm_90 SASS, no GPU).

Pins the design the PREDICTION rests on, so that a change that loses it fails here rather than only
moving a number in bench/results: one launch, inputs read once, the per-element instruction count
of the expm1 loop, and an occupancy that hides latency.  The compile runs in a child process, as
tests/static/conftest.py's do: this process may have defined the kernels for Triton's interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.requires_triton

REPO = Path(__file__).resolve().parents[2]
BATCH, DIM, L, N = 8, 3072, 2048, 128

_CHILD = f"""
import json
from static import perf_model, predictions
(w,) = predictions.triton_mean_lti_work({N}, {BATCH}, {DIM}, {L}, "bfloat16")
p = perf_model.predict(w)
print(json.dumps(dict(kernel=w.kernel, warp_instr=w.warp_instr, bytes=w.bytes, regs=w.regs, blocks=w.blocks,
                      blocks_per_sm=p.blocks_per_sm, warps_per_scheduler=p.warps_per_scheduler, ms=p.ms)))
"""


@pytest.fixture(scope="module")
def mean_lti_work():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "bench"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", _CHILD], cwd=REPO / "bench", env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_launch_reading_the_inputs_once(mean_lti_work):
    w = mean_lti_work
    assert w["kernel"] == "_mean_lti_sums_kernel"
    # delta, B and C are read once: the bytes are those of the tensors, not of a (batch, dim, N, L) block.
    inputs = BATCH * DIM * L * 2 + 2 * BATCH * N * L * 2
    assert inputs <= w["bytes"] < 1.1 * inputs, (w["bytes"], inputs)


def test_instructions_per_element_and_occupancy(mean_lti_work):
    w = mean_lti_work
    # One expm1(dt A) per (batch, channel, state, step): 13 SASS instructions of arithmetic (exp2, a
    # degree-6 polynomial, the select, two accumulations) plus loads and addressing; 16.3 in all
    # when this was written.  A redesign that costs more says so here.
    per_element = w["warp_instr"] * 32 / (BATCH * DIM * L * N)
    assert 13 <= per_element < 18, per_element
    # <= 128 registers: four or more 4-warp programs per SM, >= 4 warps per scheduler to hide latency,
    # and enough programs for every SM of an H200.
    assert w["regs"] <= 128 and w["blocks_per_sm"] >= 4 and w["warps_per_scheduler"] >= 4, w
    assert w["blocks"] >= 4 * 132, w["blocks"]
