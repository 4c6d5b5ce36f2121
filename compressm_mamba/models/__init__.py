"""One adapter per model family with Mamba layers: what its SSM layer is, how its states group, how
to cut it (``mamba``, ``mamba2``, ``falcon_mamba``, ``jamba``, ``zamba``, ``zamba2``, ``bamba``,
``granitemoehybrid``, ``nemotron_h``, ``falcon_h1``, ``mamba_ssm``).  ``base`` is the adapter
interface, ``layouts`` the two layer layouts and their cuts (written once), ``registry`` finds a
model's SSM layers; ``drop_in`` and ``balanced_mamba2`` are our own mixer classes."""
