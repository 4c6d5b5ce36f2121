"""Tiny models of every transformers family with Mamba layers, built from config (no download).

Each has at least two SSM layers (so per-layer state sizes can differ) and, for the hybrids, the
family's attention (and MoE / MLP) layers; N = 8 states.  ``tiny(family, groups=...)`` sets the
B/C group count of Mamba2-style families; Zamba's heads are its groups.
"""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
STATE = 8

FAMILIES = ("mamba", "falcon_mamba", "mamba2", "jamba", "zamba", "zamba2", "bamba", "granitemoehybrid",
            "nemotron_h", "falcon_h1")
MAMBA2_STYLE = ("mamba2", "zamba2", "bamba", "granitemoehybrid", "nemotron_h", "falcon_h1")
# families whose uniform cut is a plain checkpoint that transformers' own from_pretrained loads
PLAIN_LOADABLE = ("mamba", "mamba2", "zamba", "zamba2", "bamba", "granitemoehybrid", "nemotron_h", "falcon_h1")


def config_kwargs(family: str, groups: int = 2) -> dict:
    """transformers config arguments of the tiny ``family`` model."""
    N = STATE
    return {
        "mamba": dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=N),
        "falcon_mamba": dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=N),
        "mamba2": dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=N, num_heads=8, head_dim=8,
                       n_groups=groups, chunk_size=8),
        "jamba": dict(COMMON, num_hidden_layers=3, mamba_d_state=N, attn_layer_period=3, attn_layer_offset=1,
                      expert_layer_period=2, expert_layer_offset=1, num_experts=2, num_experts_per_tok=1),
        "zamba": dict(COMMON, num_hidden_layers=3, mamba_d_state=N, n_mamba_heads=groups,
                      layers_block_type=["mamba", "hybrid", "hybrid"]),
        "zamba2": dict(COMMON, num_hidden_layers=2, mamba_d_state=N, n_mamba_heads=4, mamba_ngroups=groups,
                       chunk_size=8, layers_block_type=["mamba", "hybrid"]),
        "bamba": dict(COMMON, num_hidden_layers=3, mamba_d_state=N, mamba_n_heads=4, mamba_d_head=16,
                      mamba_n_groups=groups, attn_layer_indices=[1], mamba_chunk_size=8),
        "granitemoehybrid": dict(COMMON, num_hidden_layers=3, mamba_d_state=N, mamba_n_heads=4, mamba_d_head=16,
                                 mamba_n_groups=groups, layer_types=["mamba", "attention", "mamba"],
                                 num_local_experts=2, num_experts_per_tok=1, mamba_chunk_size=8),
        "nemotron_h": dict(COMMON, num_hidden_layers=3, ssm_state_size=N, mamba_num_heads=4, mamba_head_dim=16,
                           n_groups=groups, hybrid_override_pattern="M*M", chunk_size=8),
        "falcon_h1": dict(COMMON, num_hidden_layers=2, mamba_d_state=N, mamba_n_heads=4, mamba_d_head=16,
                          mamba_n_groups=groups, mamba_chunk_size=8, mamba_d_ssm=64),
    }[family]


def tiny(family: str, groups: int = 2, seed: int = 0):
    """The tiny ``family`` causal LM, float32, eval mode, with A spread so that states differ."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **config_kwargs(family, groups))
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log") or name.endswith("dt_bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def zero_dropped_(adapter, keep: torch.Tensor) -> None:
    """Make ``adapter``'s layer feed zeros to the scan for the states not in ``keep`` ((G, r) per
    group) while every shape stays: the reference a selection cut must equal (METHOD.md §5)."""
    from compressm_mamba.models.layouts import Mamba2Layout, NormalisedBCLayout
    from compressm_mamba.models.zamba import ZambaAdapter

    m, N, G = adapter.module, adapter.state_size, adapter.ngroups
    dropped = torch.ones(G, N, dtype=torch.bool)
    dropped[torch.arange(G)[:, None], keep] = False
    with torch.no_grad():
        if isinstance(adapter, NormalisedBCLayout):  # zero the norm's output: it still sees all N
            mask = (~dropped[0]).to(torch.float32)
            for norm in (m.b_layernorm, m.c_layernorm):
                norm.register_forward_hook(lambda mod, args, out: out * mask.to(out.dtype))
        elif isinstance(adapter, ZambaAdapter):
            R = m.time_step_rank
            for h in range(G):
                drop = dropped[h].nonzero().squeeze(1)
                m.x_proj_weight[h, R + drop] = 0
                m.x_proj_weight[h, R + N + drop] = 0
        elif isinstance(adapter, Mamba2Layout):
            prefix, I, _ = adapter._layout()
            drop = dropped.reshape(-1).nonzero().squeeze(1)
            for offset in (I, I + G * N):  # B block, C block inside the conv channels
                m.conv1d.weight[offset + drop] = 0
                if m.conv1d.bias is not None:
                    m.conv1d.bias[offset + drop] = 0
                m.in_proj.weight[prefix + I + offset + drop] = 0
        else:
            R = getattr(m, adapter._dt_rank)
            drop = dropped[0].nonzero().squeeze(1)
            m.x_proj.weight[R + drop] = 0
            m.x_proj.weight[R + N + drop] = 0


def some_states(adapter, r: int, seed: int = 0) -> torch.Tensor:
    """A (G, r) set of kept states, different in every group (sorted per group)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(adapter.state_size, generator=g)[:r].sort().values
                        for _ in range(adapter.ngroups)])


def recurrent_state_shapes(model, prompt: torch.Tensor) -> dict:
    """{SSM layer name: shape of its decode-cache recurrent state} after a prefill of ``prompt``."""
    from compressm_mamba.compat import cache_states
    from compressm_mamba.models.registry import find_mixers

    with torch.no_grad():
        out = model(prompt, use_cache=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache_params", None)
    return {a.name: tuple(cache_states(cache, a.module.layer_idx)[1].shape) for a in find_mixers(model)}


def reference_mixer_output(adapter, hidden: torch.Tensor) -> torch.Tensor:
    """The layer's output rebuilt from the adapter's recomputed (delta, A, B, C) and the float64
    reference scan: proves ``ssm_inputs`` are the values the family's forward scans with.

    hidden: (batch, L, hidden) float32, no padding.  Mamba2-style layers whose gate goes through a
    gated RMS norm (every family here, Falcon-H1 with ``mamba_rms_norm``) only.
    """
    from compressm_mamba.models.layouts import Mamba2Layout
    from compressm_mamba.models.zamba import ZambaAdapter
    from compressm_mamba.reference import selective_scan, selective_scan_mamba2

    m = adapter.module
    batch, L, _ = hidden.shape
    delta, A, B, C = (t.double() for t in adapter.ssm_inputs(hidden))
    if isinstance(adapter, Mamba2Layout):
        prefix, I, conv_dim = adapter._layout()
        z, xBC, _ = adapter._project(hidden)[..., prefix:].split([I, conv_dim, adapter.channels], dim=-1)
        x = m.act(m.conv1d(xBC.transpose(1, 2))[..., :L]).transpose(1, 2)[..., :I]
        y = selective_scan_mamba2(x.reshape(batch, L, adapter.channels, -1).double(), delta.transpose(1, 2), A[:, 0],
                                  B.permute(0, 3, 1, 2), C.permute(0, 3, 1, 2), m.D.double())
        return m.out_proj(m.norm(y.reshape(batch, L, I).float(), z))
    proj = m.in_proj(hidden).transpose(1, 2)  # (batch, 2·d_inner, L)
    if isinstance(adapter, ZambaAdapter):  # x and the gate interleave channel by channel
        x, z = proj.view(batch, -1, 2, L)[:, :, 0], proj.view(batch, -1, 2, L)[:, :, 1]
    else:
        x, z = proj.chunk(2, dim=1)
    x = m.act(m.conv1d(x)[..., :L])
    y = selective_scan(x.double(), delta, A, B, C, m.D.double().reshape(-1), z.double())
    return m.out_proj(y.transpose(1, 2).float())
