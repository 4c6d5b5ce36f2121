"""Shared test helpers: declared tolerances and random selective-SSM inputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def assert_close(actual, expected, *, rtol: float, atol: float, name: str = "tensor") -> None:
    """torch.testing-style closeness with a report of relative error, max-abs error and worst index."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.to(torch.float64)
    e = expected.to(torch.float64)
    assert torch.isfinite(a).all(), f"{name}: non-finite values in the result"
    diff = (a - e).abs()
    allowed = atol + rtol * e.abs()
    if (diff <= allowed).all():
        return
    worst = int((diff - allowed).flatten().argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    rel = float(diff.flatten()[worst] / e.abs().flatten()[worst].clamp_min(1e-300))
    raise AssertionError(
        f"{name}: max abs err {float(diff.max()):.3e}, worst at {idx}: "
        f"{float(a[idx]):.6e} vs {float(e[idx]):.6e} (rel {rel:.3e}); rtol={rtol}, atol={atol}"
    )


def random_scan_inputs(
    batch=2, dim=5, N=7, L=11, ngroups=None, dtype=torch.float64, seed=0, with_D=True, with_z=True, with_bias=True
):
    """Random inputs in selective_scan_fn's layout, with a stable A (negative) and moderate dt."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u = rnd(batch, dim, L)
    delta = rnd(batch, dim, L) * 0.5 - 1.0  # softplus of this is ~0.1-0.8
    A = -torch.exp(rnd(dim, N) * 0.5)
    bc_shape = (batch, N, L) if ngroups is None else (batch, ngroups, N, L)
    B = rnd(*bc_shape)
    C = rnd(*bc_shape)
    D = rnd(dim) if with_D else None
    z = rnd(batch, dim, L) if with_z else None
    delta_bias = rnd(dim) * 0.1 if with_bias else None
    cast = (lambda t: None if t is None else t.to(dtype))
    return dict(
        u=cast(u), delta=cast(delta), A=cast(A), B=cast(B), C=cast(C), D=cast(D), z=cast(z),
        delta_bias=cast(delta_bias),
    )


def random_gramian_inputs(batch=2, dim=3, N=6, L=9, ngroups=None, seed=0):
    """(delta, A, B, C, delta_bias) for the Gramian estimators, float64."""
    x = random_scan_inputs(batch, dim, N, L, ngroups=ngroups, seed=seed, with_D=False, with_z=False)
    return x["delta"], x["A"], x["B"], x["C"], x["delta_bias"]


def tiny_mamba(state_size=16, layers=2, hidden=32, vocab=64, seed=0):
    """A MambaForCausalLM built from config (no download), float32, in eval mode."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    config = MambaConfig(hidden_size=hidden, state_size=state_size, num_hidden_layers=layers, vocab_size=vocab)
    model = MambaForCausalLM(config).eval()
    _spread_A(model)
    return model


def tiny_mamba2(state_size=16, layers=2, hidden=32, vocab=64, groups=2, seed=0):
    """A Mamba2ForCausalLM built from config (no download): 8 heads of 8, ``groups`` B/C groups."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    config = Mamba2Config(hidden_size=hidden, state_size=state_size, num_hidden_layers=layers, vocab_size=vocab,
                          head_dim=8, n_groups=groups, num_heads=2 * hidden // 8, expand=2, chunk_size=8)
    return Mamba2ForCausalLM(config).eval()


def _spread_A(model):
    """Mamba's init gives every channel the same A row; perturb it so that states are distinguishable."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            with torch.no_grad():
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def random_ids(batch=4, length=24, vocab=64, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def mamba2_reference_output(adapter, hidden):
    """A HF (or balanced) Mamba2 mixer's output rebuilt from the adapter's recomputed (delta, A, B, C)
    and the float64 reference scan: proves ssm_inputs are the values the mixer's forward uses."""
    from compressm_mamba.reference import selective_scan_mamba2

    m = adapter.module
    batch, L, _ = hidden.shape
    I = m.intermediate_size
    delta, A, B, C = adapter.ssm_inputs(hidden)
    z, xBC, _ = m.in_proj(hidden).split([I, m.conv_dim, m.num_heads], dim=-1)
    x = m.act(m.conv1d(xBC.transpose(1, 2))[..., :L]).transpose(1, 2)[..., :I]
    y = selective_scan_mamba2(
        x.reshape(batch, L, m.num_heads, m.head_dim).double(), delta.transpose(1, 2).double(), A[:, 0].double(),
        B.permute(0, 3, 1, 2).double(), C.permute(0, 3, 1, 2).double(), m.D.double(),
    )
    return m.out_proj(m.norm(y.reshape(batch, L, I).float(), z))


def reference_scan_with_grads(inputs, dout, softplus):
    """float64 reference scan on a kernel's (rounded) inputs: out, last state and autograd gradients.

    inputs: the dict of ``selective_scan`` tensor arguments (None for absent ones); dout: like out.
    """
    from compressm_mamba.reference import selective_scan

    x64 = {k: None if v is None else v.detach().cpu().double().requires_grad_() for k, v in inputs.items()}
    out, last = selective_scan(**x64, delta_softplus=softplus, return_last_state=True)
    (out * dout.detach().cpu().double()).sum().backward()
    return out.detach(), last.detach(), {k: None if v is None else v.grad for k, v in x64.items()}


def reference_checkpoints(inputs, softplus, chunk_size):
    """The state before each chunk's first step: the reference's last state on the prefix before it.

    Returns (batch, dim, ceil(L / chunk_size), N) float64 — the kernels' forward checkpoints.
    """
    from compressm_mamba.reference import selective_scan

    batch, dim, L = inputs["u"].shape
    N = inputs["A"].shape[1]
    x64 = {k: None if v is None else v.detach().cpu().double() for k, v in inputs.items()}
    ckpts = []
    for c in range(math.ceil(L / chunk_size)):
        t0 = c * chunk_size
        if t0 == 0:
            ckpts.append(torch.zeros(batch, dim, N, dtype=torch.float64))
            continue
        prefix = {k: v if v is None or k in ("A", "D", "delta_bias") else v[..., :t0] for k, v in x64.items()}
        ckpts.append(selective_scan(**prefix, delta_softplus=softplus, return_last_state=True)[1])
    return torch.stack(ckpts, dim=2) if ckpts else torch.zeros(batch, dim, 0, N, dtype=torch.float64)


def gramian_padding_mask(batch, L):
    """Left padding on the first sequence (all of it when L == 1), a hole in the last one."""
    mask = torch.ones(batch, L, dtype=torch.bool)
    mask[0, : L // 3 + 1] = False
    if L >= 3:
        mask[-1, L // 2] = False
    return mask


def gramian_kernel_inputs(batch, dim, N, L, ngroups, *, device, dtype=torch.float32, bias=True, softplus=True,
                          masked=True, constant_rows=False, seed=0):
    """Gramian kernel inputs on ``device`` (delta / B / C in ``dtype``) and their float64 twins on the CPU.

    Shapes: delta (batch, dim, L), A (dim, N), B / C (batch, ngroups, N, L), delta_bias (dim,), mask
    (batch, L) from ``padding_mask``.  Returns (kernel_args, ref_args), two dicts of keyword arguments.
    """
    delta, A, B, C, delta_bias = random_gramian_inputs(batch, dim, N, L, ngroups=ngroups, seed=seed)
    if constant_rows:
        A = A[:, :1].expand(dim, N).contiguous()
    if not softplus:
        delta = F.softplus(delta)  # positive step sizes, as softplus would have made them
    kernel_args = dict(
        delta=delta.to(dtype).to(device),
        A=A.float().to(device),
        B=B.to(dtype).to(device),
        C=C.to(dtype).to(device),
        delta_bias=delta_bias.float().to(device) if bias else None,
        delta_softplus=softplus,
        mask=gramian_padding_mask(batch, L).to(device) if masked else None,
    )
    ref_args = dict(kernel_args)
    for name, value in kernel_args.items():
        if torch.is_tensor(value):
            ref_args[name] = value.cpu().double() if value.is_floating_point() else value.cpu()
    return kernel_args, ref_args
