"""Plain-PyTorch fast paths (vectorised over time) used by ``compressm_mamba.ops`` on any device."""
