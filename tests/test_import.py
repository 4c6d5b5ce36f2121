"""Import hygiene: torch alone suffices, CUDA is never initialised, `kernels` never shadows HF's."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKED = ["triton", "mamba_ssm", "causal_conv1d", "selective_scan_cuda", "transformers", "compressm_mamba._C"]


def run_python(code: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_import_needs_only_torch_and_never_initialises_cuda(tmp_path):
    code = f"""
        import sys, importlib.abc

        class Block(importlib.abc.MetaPathFinder):
            # Pretend the optional dependencies are not installed at all.
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r} or name in {BLOCKED!r}:
                    raise ImportError(f"blocked for this test: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import compressm_mamba
        import compressm_mamba.reference
        import compressm_mamba.kernels
        from compressm_mamba.reference import gramians, selective_scan
        assert not torch.cuda.is_initialized(), "import initialised CUDA"
        loaded = [m for m in {BLOCKED!r} if m in sys.modules]
        assert not loaded, f"optional modules imported: {{loaded}}"
        print("ok")
    """
    # Run from a neutral folder so that only the installed package can be found.
    proc = run_python(code, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_kernels_folder_is_not_a_top_level_package():
    # From the repository root the folder is on sys.path; importing it as `kernels` must fail loudly,
    # while compressm_mamba.kernels resolves to the same folder.
    proc = run_python(
        """
        import importlib, os
        try:
            import kernels
        except ImportError as e:
            print("refused:", e)
        else:
            # Hugging Face's kernel-hub package may legitimately be installed; it is not ours.
            assert os.path.dirname(kernels.__file__) != os.path.abspath("kernels"), "our kernels/ imported as top-level"
            print("hf kernels")
        import compressm_mamba.kernels as ck
        assert os.path.dirname(ck.__file__) == os.path.abspath("kernels"), ck.__file__
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused: compressm_mamba's Triton kernels must be imported as `compressm_mamba.kernels`" in proc.stdout \
        or "hf kernels" in proc.stdout


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"COMPRESSM_MAMBA_SKIP_CUDA_BUILD": "1"}, "COMPRESSM_MAMBA_SKIP_CUDA_BUILD is set"),
    ],
)
def test_setup_reports_why_the_cuda_build_is_skipped(env, reason):
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "compressm_mamba"
    assert f"skipping the CUDA extension: {reason}" in proc.stderr


def test_setup_skips_cuda_build_without_cuda_torch():
    import torch

    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA here: the build is not skipped for lack of it")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESSM_MAMBA_")}
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipping the CUDA extension:" in proc.stderr
    assert "CPU build" in proc.stderr or "no CUDA sources" in proc.stderr


def test_transformers_does_not_mistake_our_kernels_folder_for_the_hub_package():
    """From the repository root, transformers' probe for Hugging Face's `kernels` finds our folder on
    sys.path; it must conclude that the hub package is absent instead of crashing or using ours."""
    pytest.importorskip("transformers")
    proc = run_python(
        """
        from compressm_mamba.compat import hub_kernels_available
        print(hub_kernels_available())
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
