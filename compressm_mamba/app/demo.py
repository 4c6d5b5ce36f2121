"""The smallest end-to-end run of the reference method, on real text that ships offline.

``python -m compressm_mamba.app.demo`` (a walk-through of the float64 reference; ``make demo`` runs the
training job, ``compressm-mamba finetune``):

1. A Mamba1-style selective SSM block (Mamba's initialisation: A = −[1..N] per channel, dt in
   [1e-3, 1e-1], B and C projected from the input) reads bytes of CPython's own standard library.
2. Its Gramians are estimated with each estimator of METHOD.md §3, turned into Hankel singular
   values and per-state importances, and a rank is chosen by tolerance.
3. The block is cut to that rank keeping the most important states, and — for comparison — the
   same number of random and of least important states; the output error of each cut on held-out
   text is printed.  The HSV ranking should give the smallest error.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from .. import reference as ref
from .data import stdlib_bytes


def stdlib_tokens(n_bytes: int, offset: int = 0) -> torch.Tensor:
    """``n_bytes`` of CPython's standard-library sources as int64 byte tokens."""
    return torch.frombuffer(bytearray(stdlib_bytes(n_bytes, offset)), dtype=torch.uint8).long()


class SelectiveBlock:
    """Random-weight Mamba1 selective SSM block (no training): the parameters a real layer has."""

    def __init__(self, dim: int, N: int, dt_rank: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        self.embed = torch.randn(256, dim, generator=g, dtype=f64)
        self.A = -torch.arange(1, N + 1, dtype=f64).repeat(dim, 1)  # Mamba's S4D-real init
        self.x_proj = torch.randn(dt_rank + 2 * N, dim, generator=g, dtype=f64) / math.sqrt(dim)
        self.dt_proj = torch.randn(dim, dt_rank, generator=g, dtype=f64) / math.sqrt(dt_rank)
        dt = torch.exp(torch.rand(dim, generator=g, dtype=f64) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus, as Mamba initialises it
        self.dt_rank, self.N = dt_rank, N

    def scan_inputs(self, tokens: torch.Tensor):
        """tokens (batch, L) -> u, delta (batch, dim, L) and B, C (batch, N, L)."""
        u = self.embed[tokens].transpose(1, 2)  # (batch, dim, L)
        proj = torch.einsum("rd,bdl->brl", self.x_proj, u)
        dt_low, B, C = proj.split([self.dt_rank, self.N, self.N], dim=1)
        delta = torch.einsum("dr,brl->bdl", self.dt_proj, dt_low)
        return u, delta, B, C


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=16, help="channels (d_inner)")
    parser.add_argument("--state", type=int, default=32, help="state size N")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="calibration sequences")
    parser.add_argument("--tau", type=float, default=0.1, help="tolerance for the rank choice")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    block = SelectiveBlock(args.dim, args.state, dt_rank=max(1, args.dim // 4), seed=args.seed)
    n = args.batch * args.seqlen
    calib = stdlib_tokens(n).view(args.batch, args.seqlen)
    held_out = stdlib_tokens(n, offset=n).view(args.batch, args.seqlen)
    print(f"selective SSM block: dim={args.dim}, N={args.state}; calibration {n} bytes of CPython's stdlib")

    u, delta, B, C = block.scan_inputs(held_out)
    kw = dict(delta_bias=block.dt_bias, delta_softplus=True)
    y_full = ref.selective_scan(u, delta, block.A, B, C, **kw)

    def cut_error(idx: torch.Tensor) -> float:
        y = ref.selective_scan(u, delta, block.A[:, idx], B[:, idx], C[:, idx], **kw)
        return float((y - y_full).norm() / y_full.norm())

    cu, cdelta, cB, cC = block.scan_inputs(calib)
    print(f"\n{'estimator':>9} | {'time s':>6} | {'N -> r':>7} | {'top-5 HSV (channel 0)':>39} | rel. output error of the cut")
    print(f"{'':>9} | {'':>6} | {'':>7} | {'':>39} | {'largest':>8} {'random':>8} {'smallest':>8}")
    for estimator in ref.ESTIMATORS:
        t0 = time.perf_counter()
        P, Q = ref.gramians(cdelta, block.A, cB, cC, estimator=estimator, **kw)
        hsv = ref.hankel_singular_values(P, Q)
        importance = ref.state_importance(P, Q, "balanced")
        r = ref.choose_rank(importance, "tolerance", tau=args.tau)
        seconds = time.perf_counter() - t0
        errors = [
            cut_error(ref.select_states(importance, r, keep, generator=torch.Generator().manual_seed(args.seed)))
            for keep in ref.KEEP_RULES
        ]
        top = " ".join(f"{v:.1e}" for v in hsv[0, :5].tolist())
        print(f"{estimator:>9} | {seconds:6.2f} | {args.state:>3}->{r:<3} | {top:>39} | "
              + " ".join(f"{e:8.4f}" for e in errors))
    print("\nlargest = keep the states with the most Hankel energy (the method); random / smallest = ablations.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
