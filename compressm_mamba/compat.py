"""Every use of transformers' internals, in one place.

transformers changes its private interfaces between minor releases (cache accessors, mixer
attributes, the flags that say whether mamba_ssm's kernels are bound). The rest of the package
calls the functions here, never those internals directly, so a new transformers release is one
file to read. The tested range is declared in pyproject.toml and exercised in CI at both ends.

Sections: versions; caches (prefill/decode state of Mamba/Mamba2 mixers); mixer attributes and
kernel-availability flags.
"""

from __future__ import annotations

# Lower and upper transformers versions the test suite runs against (CI runs both).
TRANSFORMERS_TESTED = ("5.17.0", "5.23.0")

# --- versions ---------------------------------------------------------------------------------

# --- caches -----------------------------------------------------------------------------------

# --- mixer attributes and kernel-availability flags -------------------------------------------
