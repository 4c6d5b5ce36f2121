"""Public functional ops: validation, dtype policy, backend dispatch (reference | torch | triton | cuda)."""

from .gramians import gramian_sums, gramians
from .selective_scan import BACKENDS, resolve_backend, selective_scan
from .selective_state_update import selective_state_update

__all__ = ["selective_scan", "selective_state_update", "gramians", "gramian_sums", "BACKENDS", "resolve_backend"]
