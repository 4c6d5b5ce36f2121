"""Balanced truncation for Mamba2 layers (METHOD.md §5, ``reduction="balanced"``).

In a Mamba2 layer every head's transition is a scalar times the identity, so ANY change of state
coordinates T commutes with it: the heads of a group (which share B and C) can be balanced
together.  With the group's Gramians summed over its heads and T the balancing transform,

    h' = T⁻¹ h,   B'_t = T⁻¹_r B_t  (r × N map),   C'_t = T_rᵀ C_t  (r × N map),

and keeping the r leading balanced directions is exact balanced truncation of the averaged system.
B and C come out of in_proj → depthwise conv1d → SiLU, a nonlinearity, so the maps cannot be folded
into in_proj: ``BalancedMamba2Mixer`` applies them after the activation and runs the scan at N' = r,
while in_proj and conv1d keep computing the N-dimensional B and C.

Such a checkpoint must not load in plain transformers: a ``Mamba2ForCausalLM`` would build the
layers at N, ignore ``B_map`` / ``C_map`` as "unexpected keys" and give wrong outputs without an
error.  So its config.json says ``model_type: "compressm_balanced_mamba2"`` (``AutoConfig`` refuses it)
and ``state_size`` is a sentence, not an int (``Mamba2Config`` refuses it); the real value is kept in
``compressm.state_size``.  ``mark_config_`` does this to a live config (its ``to_dict``), and
``unmark_config_dict`` undoes it for ``compressm_mamba.from_pretrained``.
"""

from __future__ import annotations

import functools

import torch

from .. import compat
from ..reference.balancing import balanced_transform

__all__ = ["group_gramians", "group_balancing_maps", "mixer_class", "mark_config_", "unmark_config_dict",
           "BALANCED_MODEL_TYPE"]

BALANCED_MODEL_TYPE = "compressm_balanced_mamba2"
STATE_SIZE_MARK = ("per layer with balanced maps: load this checkpoint with compressm_mamba.from_pretrained "
                   "(plain transformers would ignore B_map/C_map and compute wrong outputs)")


@functools.lru_cache(maxsize=None)
def _marked_config_class(base):
    """A subclass of the config class ``base`` whose saved form plain transformers cannot load."""

    class BalancedMamba2Config(base):
        model_type = BALANCED_MODEL_TYPE

        def to_dict(self):
            out = super().to_dict()
            record = out.get("compressm")
            if isinstance(record, dict) and record.get("balanced"):
                # not "model_type": transformers takes a nested dict with its model_type for the config itself
                out["compressm"] = dict(record, state_size=out["state_size"], base_model_type=base.model_type)
                out["state_size"] = STATE_SIZE_MARK
                out["model_type"] = BALANCED_MODEL_TYPE
            return out

    BalancedMamba2Config.__name__ = BalancedMamba2Config.__qualname__ = f"Balanced{base.__name__}"
    return BalancedMamba2Config


def mark_config_(config) -> None:
    """Make ``config`` save as a checkpoint only ``compressm_mamba.from_pretrained`` loads (in place)."""
    if getattr(type(config), "model_type", None) != BALANCED_MODEL_TYPE:
        config.__class__ = _marked_config_class(type(config))


def unmark_config_dict(config_dict: dict) -> dict:
    """The plain Mamba2 config dict of a marked one (a copy; unmarked dicts are returned unchanged)."""
    if config_dict.get("model_type") != BALANCED_MODEL_TYPE:
        return config_dict
    out = dict(config_dict, model_type=config_dict["compressm"].get("base_model_type", "mamba2"))
    out["state_size"] = int(out["compressm"]["state_size"])
    return out


def group_gramians(P: torch.Tensor, Q: torch.Tensor, ngroups: int):
    """Sum per-head Gramians (nheads, N, N) over the heads of each group -> (ngroups, N, N) each."""
    H, N = P.shape[0], P.shape[-1]
    return P.reshape(ngroups, H // ngroups, N, N).sum(1), Q.reshape(ngroups, H // ngroups, N, N).sum(1)


def group_balancing_maps(P_g: torch.Tensor, Q_g: torch.Tensor, r: int, *, name: str | None = None):
    """Maps onto the r leading balanced directions of each group's Gramians (ngroups, N, N).

    Returns B_map = T⁻¹[:r, :] and C_map = T[:, :r]ᵀ, each (ngroups, r, N) float64: the scan then sees
    B' = B_map[g] B and C' = C_map[g] C.
    """
    T, Tinv, _ = balanced_transform(P_g, Q_g, name=name)
    return Tinv[:, :r, :], T[:, :, :r].transpose(1, 2)


@functools.lru_cache(maxsize=None)
def mixer_class():
    """The ``BalancedMamba2Mixer`` class; defined on first use because it subclasses transformers'
    ``Mamba2Mixer`` (importing this module never imports transformers)."""
    hf = compat.hf_modeling_module("mamba2")  # its kernel-or-fallback functions, checked present

    class BalancedMamba2Mixer(hf.Mamba2Mixer):
        """HF ``Mamba2Mixer`` whose scan runs on r balanced directions of its N-dimensional B and C.

        Buffers ``B_map``, ``C_map``: (ngroups, r, N).  ``full_state_size`` is N (in_proj, conv1d and
        the conv cache), ``ssm_state_size`` is r (the scan and its cache).  Parameters and their names
        are the HF mixer's; a model is turned into this class in place by the surgery.
        """

        @property
        def full_state_size(self) -> int:
            return int(self.B_map.shape[-1])

        def _project(self, BC: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
            """(batch, L, ngroups * N) -> (batch, L, ngroups, r)."""
            batch, L, _ = BC.shape
            BC = BC.reshape(batch, L, self.n_groups, self.full_state_size)
            return torch.einsum("blgn,grn->blgr", BC, maps.to(BC.dtype))

        def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
            batch, L, _ = hidden_states.shape
            I, G, H, P = self.intermediate_size, self.n_groups, self.num_heads, self.head_dim
            N, r = self.full_state_size, self.ssm_state_size
            conv_state = recurrent_state = None
            if cache_params is not None:
                conv_state, recurrent_state = compat.cache_states(cache_params, self.layer_idx)
            one_token = conv_state is not None and L == 1 and not compat.cache_is_recording_past(
                cache_params, self.layer_idx)

            hidden_states = hf.apply_mask_to_padding_states(hidden_states, attention_mask)
            z, xBC, dt = self.in_proj(hidden_states).split([I, self.conv_dim, H], dim=-1)
            weight, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
            xBC = xBC.transpose(1, 2)
            if one_token:
                xBC = hf.causal_conv1d_update(xBC, conv_state, weight, bias, activation=self.activation)
            else:
                if cache_params is not None:
                    xBC = compat.cache_update_conv_state(cache_params, xBC, self.layer_idx, self.conv_kernel_size)
                xBC = hf.causal_conv1d_fn(xBC, weight, bias, activation=self.activation)
                if cache_params is not None:
                    xBC = xBC[:, :, -L:]
            xBC = hf.apply_mask_to_padding_states(xBC.transpose(1, 2), attention_mask)
            x, B, C = xBC.split([I, G * N, G * N], dim=-1)
            B, C = self._project(B, self.B_map), self._project(C, self.C_map)  # (batch, L, G, r)
            A = -torch.exp(self.A_log.float())

            if recurrent_state is not None and L == 1:
                y = hf.mamba2_selective_state_update(
                    recurrent_state, x.view(batch, H, P), dt.transpose(1, 2).expand(-1, -1, P),
                    A[:, None, None].expand(-1, P, r), B[:, 0], C[:, 0], self.D[:, None].expand(-1, P),
                    z=None, dt_bias=self.dt_bias[:, None].expand(-1, P), dt_softplus=True,
                ).view(batch, 1, -1)
            else:
                result = hf.mamba2_chunk_scan(
                    x.view(batch, L, H, P), dt, A, B, C, chunk_size=self.chunk_size, D=self.D, z=None,
                    return_final_states=cache_params is not None, dt_bias=self.dt_bias, dt_softplus=True,
                    initial_states=recurrent_state, dt_limit=self.time_step_limit,
                )
                if cache_params is not None:
                    result, final_state = result
                    compat.cache_update_recurrent_state(cache_params, final_state, self.layer_idx)
                y = result.reshape(batch, L, -1)
            return self.out_proj(self.norm(y, z).to(hidden_states.dtype))

    return BalancedMamba2Mixer
