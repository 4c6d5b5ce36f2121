"""The specification of compressm_mamba (docs/METHOD.md), in plain PyTorch.

Float64-capable, any device, loops allowed: kernels and model code are checked against it.

Scans       ``selective_scan`` (mamba_ssm's selective_scan_fn layout), ``selective_scan_mamba2``;
            ``selective_state_update`` (one decode step of the Mamba1 scan).
Gramians    ``gramians`` for the estimators ``mean_lti``, ``frozen``, ``ltv``; ``gramian_statistics``
            / ``gramians_from_statistics`` for accumulation over batches.
HSVs        ``hankel_singular_values``, ``balanced_transform`` (square-root method, float64).
GHOST       ``ghost_sums`` (the forward-pass state score of Menezes & Kyrillidis 2026).
Selection   ``state_importance``, ``choose_rank``, ``select_states``, ``reduce_selective_ssm``.
"""

from .balancing import balanced_transform, check_gramians, gramian_factor, hankel_factors, hankel_singular_values
from .gramians import ESTIMATORS, GramianStatistics, gramian_statistics, gramians, gramians_from_statistics
from .ghost import ghost_sums
from .selection import (
    IMPORTANCE_RULES,
    KEEP_RULES,
    RANK_MODES,
    choose_rank,
    reduce_selective_ssm,
    select_states,
    state_importance,
)
from .selective_scan import selective_scan, selective_scan_mamba2
from .selective_state_update import selective_state_update

__all__ = [
    "selective_scan",
    "selective_scan_mamba2",
    "selective_state_update",
    "ESTIMATORS",
    "GramianStatistics",
    "gramian_statistics",
    "gramians_from_statistics",
    "gramians",
    "check_gramians",
    "gramian_factor",
    "hankel_factors",
    "hankel_singular_values",
    "balanced_transform",
    "ghost_sums",
    "IMPORTANCE_RULES",
    "RANK_MODES",
    "KEEP_RULES",
    "state_importance",
    "choose_rank",
    "select_states",
    "reduce_selective_ssm",
]
