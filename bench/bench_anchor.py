"""The mamba_ssm anchor: our selective scan against mamba_ssm's CUDA selective scan at N=16.

    python bench/bench_anchor.py build SRC BUILD   # compile SRC/csrc/selective_scan (an unpacked sdist) for
                                                  # sm_90 only into BUILD (minutes; bench/gpu_anchor.sh
                                                  # runs it in the background)
    python bench/bench_anchor.py bench BUILD       # time it beside ours; rows to bench/results/anchor.csv

mamba_ssm's kernel is built with its own compiler flags (its setup.py: -O3, --use_fast_math, the
half/bf16 operator macros) but for sm_90 alone, as a torch JIT extension named ``selective_scan_cuda``
— its Python package is not needed: the benchmark calls the extension's ``fwd`` / ``bwd`` with the
arguments mamba_ssm's ``SelectiveScanFn`` passes.  mamba_ssm's selective scan supports N <= 256 but
is built and tuned for N=16 (Mamba1's default), where the comparison is made.

Shape (batch 8, dim 3072, L 2048) bf16, delta_softplus, D, z and delta_bias present (a Mamba1 layer).
Both kernels are gated against the float64 reference on a few channels before they are timed.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# mamba_ssm's setup.py flags for selective_scan_cuda (2.3.2.post1), minus its -gencode list and
# --threads; C++20 because torch >= 2.13's headers need it (mamba_ssm's sources compile with it).
NVCC_FLAGS = ["-O3", "-std=c++20", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "--ptxas-options=-v",
              "-lineinfo"]
SHAPE = (8, 3072, 2048)
N = 16


def sources(src: str) -> list:
    found = sorted(glob.glob(os.path.join(src, "csrc", "selective_scan", "*.cu")))
    cpp = os.path.join(src, "csrc", "selective_scan", "selective_scan.cpp")
    if not found or not os.path.exists(cpp):
        raise SystemExit(f"{src}: no csrc/selective_scan/*.cu + selective_scan.cpp (an unpacked mamba-ssm sdist?)")
    return [cpp, *found]


def build(src: str, build_dir: str):
    from torch.utils.cpp_extension import load

    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # sm_90 only: one arch, a third of mamba_ssm's build
    os.makedirs(build_dir, exist_ok=True)
    module = load(name="selective_scan_cuda", sources=sources(src), build_directory=build_dir, verbose=True,
                  extra_cflags=["-O3", "-std=c++20"], extra_cuda_cflags=NVCC_FLAGS,
                  extra_include_paths=[os.path.join(src, "csrc", "selective_scan")])
    print("built", module.__file__)


def load_built(build_dir: str):
    sys.path.insert(0, build_dir)
    import selective_scan_cuda  # the .so that `build` left in build_dir

    return selective_scan_cuda


def bench(build_dir: str, reps: int, write_csv: bool):
    from common import append_rows, environment, gate, time_ms
    from gpu_realshape_check import checked_channels, scan_inputs

    from compressm_mamba import ops
    from compressm_mamba.reference import selective_scan as reference_scan

    device = torch.device("cuda")
    ext = load_built(build_dir)
    batch, dim, L = SHAPE
    x = scan_inputs(batch, dim, L, N, torch.bfloat16, device)
    idx = checked_channels(dim, 8).to(device)
    ref = {k: (v[:, idx] if k in ("u", "delta", "z") else v[idx] if k in ("A", "D", "delta_bias") else v).double()
           for k, v in x.items()}
    expected = reference_scan(**ref, delta_softplus=True)
    u, delta, A, B, C, D, z, bias = (x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    dout = torch.randn_like(u)

    def mamba_fwd():
        return ext.fwd(u, delta, A, B, C, D, z, bias, True)

    def mamba_fwd_bwd():
        out, state, *rest = ext.fwd(u, delta, A, B, C, D, z, bias, True)
        # SelectiveScanFn.backward's call (z given: the gated output is recomputed in the backward)
        ext.bwd(u, delta, A, B, C, D, z, bias, dout, state, out, None, True, False)

    mamba_out = mamba_fwd()
    errors = {"mamba_ssm": gate("mamba_ssm", (mamba_out[2] if z is not None else mamba_out[0])[:, idx].float().cpu(),
                                expected, 3e-2)}
    timings = {"mamba_ssm": (time_ms(mamba_fwd, device, reps=reps), time_ms(mamba_fwd_bwd, device, reps=reps))}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    for backend in ("cuda", "triton"):
        try:
            ops.resolve_backend(backend, device, N)
        except (RuntimeError, ValueError) as err:
            print(f"skip {backend}: {err}")
            continue
        got = ops.selective_scan(**x, delta_softplus=True, backend=backend)
        errors[backend] = gate(backend, got[:, idx].float().cpu(), expected, 3e-2)

        def fwd(b=backend):
            with torch.no_grad():
                ops.selective_scan(**x, delta_softplus=True, backend=b)

        def fwd_bwd(b=backend):
            ops.selective_scan(**leaves, delta_softplus=True, backend=b).backward(dout)

        timings[backend] = (time_ms(fwd, device, reps=reps), time_ms(fwd_bwd, device, reps=reps))
    env = environment(device)
    base_f, base_fb = timings["mamba_ssm"]
    rows = [dict(**env, kernel=name, batch=batch, dim=dim, seqlen=L, N=N, dtype="bfloat16", fwd_ms=round(f, 3),
                 fwd_bwd_ms=round(fb, 3), fwd_vs_mamba_ssm=round(f / base_f, 2),
                 fwd_bwd_vs_mamba_ssm=round(fb / base_fb, 2), max_rel_err=f"{errors[name]:.1e}")
            for name, (f, fb) in timings.items()]
    for r in rows:
        print(f"{r['kernel']:>10}: fwd {r['fwd_ms']:8.3f} ms ({r['fwd_vs_mamba_ssm']:.2f}x mamba_ssm), fwd+bwd "
              f"{r['fwd_bwd_ms']:8.3f} ms ({r['fwd_bwd_vs_mamba_ssm']:.2f}x), err {r['max_rel_err']}")
    if write_csv:
        print("appended to", append_rows("anchor.csv", rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("src")
    b.add_argument("build_dir")
    t = sub.add_parser("bench")
    t.add_argument("build_dir")
    t.add_argument("--reps", type=int, default=10)
    t.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        build(args.src, args.build_dir)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_anchor: no CUDA device")
        bench(args.build_dir, args.reps, not args.no_csv)


if __name__ == "__main__":
    main()
