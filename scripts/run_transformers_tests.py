"""Run transformers' own model tests with compressm_mamba's drop-in mixer swapped into every model they build.

    python scripts/run_transformers_tests.py /path/to/transformers              # drop-in, Mamba tests
    python scripts/run_transformers_tests.py /path/to/transformers --mode vanilla   # the baseline
    python scripts/run_transformers_tests.py /path/to/transformers --use-cache off -- -x -k generate

The first argument is a transformers source checkout (or any folder laid out like one: ``tests/``
with ``tests/models/<model>/test_modeling_<model>.py`` and the helper modules it imports) of the
same version as the installed transformers: the tests import the installed library.  Nothing here
copies or ships transformers' tests; nothing downloads (the runner sets the hub's offline flags,
and deselects the ``*IntegrationTest*`` classes, which need released checkpoints).

How the drop-in gets in: ``PreTrainedModel.post_init`` (the last step of every transformers model's
``__init__``, also under ``from_pretrained``) is wrapped so that a model holding a transformers
``MambaMixer`` goes through ``compressm_mamba.replace_mixers_`` before the test sees it.  Nothing in
the tests is edited.

How the run proves our path ran: the plugin counts, per test, the calls of
  - our ops, as the drop-in mixer calls them: ``selective_scan`` without a cache (training /
    ``use_cache=False``), ``selective_scan(return_last_state=True)`` (the cached prefill) and
    ``selective_state_update`` (each decoded token);
  - transformers' own Mamba ops (``mamba_selective_scan``, ``mamba_selective_state_update``,
    ``mamba_inner_fn``), which a drop-in model must never reach.
At the end it prints the totals and the tests that reached transformers' ops, and with
``--mode drop-in`` the exit status is non-zero (4) when any of our three paths never ran or a
drop-in model reached transformers' scan or step, whatever pytest's own result: a run that
silently tested transformers' path cannot pass.  ``--use-cache on|off`` overrides the model
configs' default ``use_cache`` (tests that pass ``use_cache`` explicitly keep theirs); the
default leaves the tests as written (they cover both).  docs/UPSTREAM_TESTS.md has the recipe.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The drop-in's three paths, and transformers' own ops that a drop-in model must not reach.
OUR_PATHS = ("scan_no_cache", "scan_prefill", "state_update")
HF_OPS = ("mamba_selective_scan", "mamba_selective_state_update", "mamba_inner_fn")
EXIT_PATH_NOT_RUN = 4


class DropInPlugin:
    """pytest plugin: gives every Mamba model the tests build the drop-in mixer; counts the ops they reach."""

    def __init__(self, mode: str = "drop-in", backend: str = "auto", use_cache: str = "as-is"):
        if mode not in ("drop-in", "vanilla"):
            raise ValueError(f"mode must be 'drop-in' or 'vanilla', got {mode!r}")
        if use_cache not in ("as-is", "on", "off"):
            raise ValueError(f"use_cache must be 'as-is', 'on' or 'off', got {use_cache!r}")
        self.mode, self.backend, self.use_cache = mode, backend, use_cache
        self.per_test: dict[str, collections.Counter] = {}
        self.models_swapped = 0
        self._current = None
        self._undo = []

    # --- patches ------------------------------------------------------------------------------
    def _patch(self, owner, name, value):
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def _count(self, key: str) -> None:
        self.per_test.setdefault(self._current or "<outside a test>", collections.Counter())[key] += 1

    def _counting(self, fn, key_of):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self._count(key_of(args, kwargs))
            return fn(*args, **kwargs)
        return wrapper

    def install(self) -> None:
        from transformers import MambaConfig, PreTrainedModel
        from transformers.models.mamba import modeling_mamba

        from compressm_mamba import compat
        from compressm_mamba.models import drop_in

        for name in HF_OPS:
            op = getattr(modeling_mamba, name)
            self._patch(modeling_mamba, name, self._counting(op, lambda a, k, n=name: n))
        def scan_path(args, kwargs):  # return_last_state is selective_scan's 10th argument
            prefill = kwargs.get("return_last_state", args[9] if len(args) > 9 else False)
            return "scan_prefill" if prefill else "scan_no_cache"
        self._patch(drop_in, "selective_scan", self._counting(drop_in.selective_scan, scan_path))
        self._patch(drop_in, "selective_state_update",
                    self._counting(drop_in.selective_state_update, lambda a, k: "state_update"))

        if self.mode == "drop-in":
            hf_mixer = compat.hf_mixer_classes()["MambaMixer"]
            post_init, plugin = PreTrainedModel.post_init, self

            @functools.wraps(post_init)
            def post_init_with_drop_in(model, *args, **kwargs):
                post_init(model, *args, **kwargs)
                # exact type: the inner MambaModel's post_init already swapped its mixers when the outer
                # MambaForCausalLM's post_init runs, so each model built counts once
                if any(type(m) is hf_mixer for m in model.modules()):
                    drop_in.replace_mixers_(model, backend=plugin.backend)
                    plugin.models_swapped += 1
            self._patch(PreTrainedModel, "post_init", post_init_with_drop_in)

        if self.use_cache != "as-is":
            init, value = MambaConfig.__init__, self.use_cache == "on"

            # wraps: testers read the config's keyword arguments from inspect.signature(Config.__init__)
            @functools.wraps(init)
            def init_with_use_cache(config, *args, **kwargs):
                init(config, *args, **kwargs)
                config.use_cache = value
            self._patch(MambaConfig, "__init__", init_with_use_cache)

    def uninstall(self) -> None:
        while self._undo:
            owner, name, value = self._undo.pop()
            setattr(owner, name, value)

    # --- pytest hooks -------------------------------------------------------------------------
    def pytest_configure(self, config):
        self.install()

    def pytest_unconfigure(self, config):
        self.uninstall()

    def pytest_runtest_setup(self, item):
        self._current = item.nodeid

    def pytest_runtest_teardown(self, item):
        self._current = None

    def totals(self) -> collections.Counter:
        total = collections.Counter()
        for counts in self.per_test.values():
            total.update(counts)
        return total

    def tests_reaching(self, keys) -> list[str]:
        return sorted(t for t, c in self.per_test.items() if any(c[k] for k in keys))

    def problems(self) -> list[str]:
        """Why this drop-in run does not show our path running (empty for a vanilla run)."""
        if self.mode != "drop-in":
            return []
        total = self.totals()
        found = [f"our {key} path never ran" for key in OUR_PATHS if not total[key]]
        if not self.models_swapped:
            found.append("no model with a transformers MambaMixer was built")
        hf = self.tests_reaching(HF_OPS)
        if hf:
            found.append(f"{len(hf)} test(s) reached transformers' own Mamba ops: {', '.join(hf)}")
        return found

    def summary(self) -> dict:
        return {"mode": self.mode, "backend": self.backend, "use_cache": self.use_cache,
                "models_swapped": self.models_swapped, "op_calls": dict(self.totals()),
                "tests_per_path": {key: len(self.tests_reaching([key])) for key in OUR_PATHS + HF_OPS},
                "tests_reaching_hf_ops": self.tests_reaching(HF_OPS), "problems": self.problems()}

    def pytest_terminal_summary(self, terminalreporter):
        s = self.summary()
        tr = terminalreporter
        tr.section(f"compressm_mamba drop-in plugin ({self.mode}, backend={self.backend}, "
                   f"use_cache={self.use_cache})")
        tr.write_line(f"models given the drop-in mixer: {s['models_swapped']}")
        for key in OUR_PATHS + HF_OPS:
            calls, tests = s["op_calls"].get(key, 0), s["tests_per_path"][key]
            tr.write_line(f"  {key:30s} calls {calls:7d} in {tests:4d} tests")
        for line in s["problems"]:
            tr.write_line(f"PROBLEM: {line}", red=True)

    def pytest_sessionfinish(self, session, exitstatus):
        if self.problems():
            session.exitstatus = EXIT_PATH_NOT_RUN


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", type=Path, help="transformers source checkout (the folder holding tests/)")
    p.add_argument("--model", default="mamba",
                   help="runs tests/models/<model>/test_modeling_<model>.py (default mamba)")
    p.add_argument("--mode", choices=("drop-in", "vanilla"), default="drop-in")
    p.add_argument("--backend", default="auto", help="replace_mixers_ backend (default auto)")
    p.add_argument("--use-cache", choices=("as-is", "on", "off"), default="as-is",
                   help="override MambaConfig's default use_cache (default: as the tests set it)")
    p.add_argument("--json", type=Path, help="write the plugin's counts (and pytest's exit status) here")
    p.add_argument("--keep-integration", action="store_true",
                   help="also run the *IntegrationTest* classes (they need checkpoints from the hub)")
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.pytest_args = argv[split + 1:]  # everything after -- goes to pytest unchanged
    return args


def check_checkout(checkout: Path, model: str) -> Path:
    """The test module's path; a clear error when the checkout is not laid out like transformers'."""
    test_file = checkout / "tests" / "models" / model / f"test_modeling_{model}.py"
    if not test_file.is_file():
        raise SystemExit(f"{test_file} not found: pass the root of a transformers source checkout "
                         "(the folder that holds tests/)")
    return test_file


def warn_on_version_mismatch(checkout: Path) -> None:
    import transformers
    init = checkout / "src" / "transformers" / "__init__.py"
    if init.is_file():
        for line in init.read_text(encoding="utf-8").splitlines():
            if line.startswith("__version__"):
                version = line.split("=", 1)[1].strip().strip("\"'")
                if version != transformers.__version__:
                    print(f"WARNING: the checkout is transformers {version}, the installed library "
                          f"{transformers.__version__}: check out the tag of the installed version",
                          file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    checkout = args.checkout.resolve()
    test_file = check_checkout(checkout, args.model)
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(flag, "1")
    sys.path.insert(0, str(REPO))
    warn_on_version_mismatch(checkout)

    import pytest

    plugin = DropInPlugin(args.mode, args.backend, args.use_cache)
    pytest_args = [str(test_file), "--rootdir", str(checkout), "-p", "no:cacheprovider", "-rfE"]
    if not args.keep_integration:
        pytest_args += ["-k", "not IntegrationTest"]
    os.chdir(checkout)
    status = int(pytest.main(pytest_args + list(args.pytest_args), plugins=[plugin]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = plugin.summary() | {"pytest_exit_status": status,
                                      "test_file": str(test_file.relative_to(checkout))}
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return status


if __name__ == "__main__":
    sys.exit(main())
