"""Static (no-GPU) kernel tooling: compile every kernel for its GPU target on a CPU machine and read
what the compiled code says about resources and speed.

Modules, in the order a report uses them:

- ``toolchain``   finds the compilers and disassemblers (Triton's bundled ptxas / nvdisasm /
                  cuobjdump, the CUDA toolkit's nvcc) and parses ``ptxas -v`` logs.
- ``triton_aot``  runs the real launchers of ``compressm_mamba.kernels`` through the public ops with
                  a stand-in Triton driver that reports a GPU target and compiles without launching.
- ``triton_cases`` which launches to make: the configuration matrix (N, dtype, optional inputs,
                  forward / backward) per op, for CI and for the full bench.
- ``cuda_ptxas``  nvcc ``-Xptxas -v`` over csrc/ (and mamba_ssm's scan for the anchor), one row per
                  kernel instantiation.
- ``sass``        loops of a cubin's SASS and their instruction mix per iteration.
- ``perf_model``  the issue-rate + bytes-moved model that turns those counts into predicted times.

Nothing here needs a GPU, and nothing here measures a speed: every time it prints is a PREDICTION.
``bench/static_report.py`` is the script; ``tests/static/`` are the CI checks built on these modules.
"""
