"""Atomic, safetensors-only persistence: a save that dies half way leaves the previous checkpoint intact."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import random_ids, tiny_mamba

import compressm_mamba as cm
from compressm_mamba import persistence
from compressm_mamba.models.registry import find_mixers
from compressm_mamba.persistence import recover, save_pretrained_atomic, save_tensors_atomic, write_json_atomic
from compressm_mamba.cut.state_sizes import load_safetensors_dir, resize_to_

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tree_digest(path):
    """{relative file: sha256} of a directory."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def leftovers(parent):
    return [n for n in os.listdir(parent) if re.match(r"^\..*\.(tmp|old)-\d+-", n)]


def assert_loads_identically(path, model):
    loaded = cm.from_pretrained(str(path))
    expected = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        assert torch.equal(p, expected[name]), name


@pytest.fixture
def saved(tmp_path):
    """A per-layer-cut model saved atomically, with the digest of its files."""
    model = tiny_mamba(state_size=8, hidden=16)
    names = [a.name for a in find_mixers(model)]
    resize_to_(model, {names[0]: 5, names[1]: 3})
    path = tmp_path / "ckpt"
    assert save_pretrained_atomic(model, str(path)) == str(path)
    return model, path, tree_digest(path)


def test_save_and_overwrite_are_complete_and_safetensors_only(saved, tmp_path):
    model, path, digest = saved
    assert "model.safetensors" in digest and "config.json" in digest
    assert not [f for f in digest if f.endswith(persistence.PICKLE_SUFFIXES)]
    assert_loads_identically(path, model)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_pretrained_atomic(model, str(path))  # replaces the previous checkpoint
    assert tree_digest(path) != digest
    assert_loads_identically(path, model)
    assert leftovers(tmp_path) == []


def test_a_writer_that_raises_half_way_leaves_the_previous_checkpoint(saved, tmp_path, monkeypatch):
    model, path, digest = saved
    import transformers.modeling_utils as mu

    def half_then_crash(tensors, filename, metadata=None):
        real_file = str(filename) + ".full"
        mu_save(tensors, real_file, metadata=metadata)
        data = open(real_file, "rb").read()
        os.remove(real_file)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full (injected)")

    mu_save = mu.safe_save_file
    monkeypatch.setattr(mu, "safe_save_file", half_then_crash)
    first = next(model.parameters())
    before = first.detach().clone()
    with torch.no_grad():
        first.add_(1.0)
    with pytest.raises(OSError, match="injected"):
        save_pretrained_atomic(model, str(path))
    assert tree_digest(path) == digest
    with torch.no_grad():
        first.copy_(before)
    assert_loads_identically(path, model)
    assert leftovers(tmp_path) == []


KILLED_SAVE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    import transformers.modeling_utils as mu
    from helpers import tiny_mamba
    from compressm_mamba.persistence import save_pretrained_atomic

    real = mu.safe_save_file

    def slow(tensors, filename, metadata=None):
        real(tensors, filename + ".full", metadata=metadata)
        data = open(filename + ".full", "rb").read()
        with open(filename, "wb") as f:          # half of the new weights are on disk ...
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        print("WRITING", flush=True)
        time.sleep(120)                          # ... when the process is killed

    mu.safe_save_file = slow
    model = tiny_mamba(state_size=8, hidden=64, layers=4, seed=1)
    save_pretrained_atomic(model, {path!r})
""")


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(saved, tmp_path):
    model, path, digest = saved
    script = KILLED_SAVE.format(tests=os.path.join(ROOT, "tests"), path=str(path))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 120
        line = ""
        while time.time() < deadline:
            line = proc.stdout.readline()
            if line.startswith("WRITING") or proc.poll() is not None:
                break
        assert line.startswith("WRITING"), f"the save never started: {proc.stderr.read()[-3000:]}"
        assert leftovers(tmp_path), "the save is not writing to a temporary sibling"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert tree_digest(path) == digest, "the previous checkpoint changed"
    assert_loads_identically(path, model)
    # the next save to the same path clears what the killed one left
    assert leftovers(tmp_path)
    save_pretrained_atomic(model, str(path))
    assert leftovers(tmp_path) == []
    assert_loads_identically(path, model)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_without_rename_exchange_a_crash_between_the_renames_is_recovered(saved, tmp_path, monkeypatch):
    model, path, digest = saved
    monkeypatch.setattr(persistence, "_exchange", lambda a, b: False)
    save_pretrained_atomic(model, str(path))  # the two-rename fallback works
    assert_loads_identically(path, model)
    digest = tree_digest(path)
    # a process killed after renaming the old checkpoint aside, before renaming the new one in
    aside = tmp_path / f".ckpt.old-{_dead_pid()}-abc"
    os.rename(path, aside)
    assert not path.exists()
    assert recover(str(path)) and tree_digest(path) == digest and leftovers(tmp_path) == []
    # a failure of the second rename puts the old one back at once
    real_rename = os.rename

    def failing_second_rename(src, dst):
        if ".tmp-" in os.path.basename(str(src)):
            raise OSError("injected rename failure")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="injected"):
        save_pretrained_atomic(model, str(path))
    monkeypatch.setattr(os, "rename", real_rename)
    assert tree_digest(path) == digest and leftovers(tmp_path) == []


def test_a_checkpoint_holding_a_pickle_is_refused(saved, tmp_path, monkeypatch):
    model, path, digest = saved

    def pickling_save(directory, **kwargs):
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))

    monkeypatch.setattr(model, "save_pretrained", pickling_save)
    with pytest.raises(RuntimeError, match="refusing to publish a checkpoint with pickled files"):
        save_pretrained_atomic(model, str(path))
    assert tree_digest(path) == digest and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="safetensors only"):
        save_pretrained_atomic(model, str(path), safe_serialization=False)
    assert save_pretrained_atomic(model, str(tmp_path / "other"), is_main_process=False) and not (tmp_path / "other").exists()


def test_plain_modules_are_saved_as_safetensors(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    module[1].weight = torch.nn.Parameter(module[1].weight.detach().clone())
    save_pretrained_atomic(module, str(tmp_path / "plain"))
    assert sorted(os.listdir(tmp_path / "plain")) == ["model.safetensors"]
    state = load_safetensors_dir(str(tmp_path / "plain"))
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())


def test_single_files_are_replaced_atomically(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    write_json_atomic({"a": 1}, str(target))
    with pytest.raises(TypeError):
        write_json_atomic({"a": object()}, str(target))  # unserialisable: nothing is written
    assert json.loads(target.read_text()) == {"a": 1}
    tensors = tmp_path / "t.safetensors"
    save_tensors_atomic({"x": torch.arange(3.0)}, str(tensors), metadata={"k": "v"})
    from safetensors.torch import save_file

    def crash(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"partial")
        raise OSError("injected")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="injected"):
        save_tensors_atomic({"x": torch.zeros(3)}, str(tensors))
    monkeypatch.setattr("safetensors.torch.save_file", save_file)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tensors))["x"], torch.arange(3.0))
    assert leftovers(tmp_path) == []


def test_compression_report_saves_atomically(tmp_path):
    model = tiny_mamba(state_size=8, hidden=16)
    report = cm.compress_(model, cm.CompressConfig(mode="rank", rank=4), [random_ids()])
    report.save(str(tmp_path / "report.json"))
    data = json.loads((tmp_path / "report.json").read_text())
    assert [layer["state_after"] for layer in data["layers"]] == [4, 4]


def test_the_package_never_unpickles():
    """No torch.load without weights_only=True, no pickle.load, in the package's sources."""
    package = os.path.join(ROOT, "compressm_mamba")
    offenders = []
    for dirpath, _, files in os.walk(package):
        for name in files:
            if not name.endswith(".py"):
                continue
            source = open(os.path.join(dirpath, name)).read()
            for m in re.finditer(r"torch\.load\(", source):
                call = source[m.start(): source.find(")", m.start()) + 1]
                if "weights_only=True" not in call:
                    offenders.append(f"{name}: {call}")
            if re.search(r"\bpickle\.loads?\(|\bdill\.load", source):
                offenders.append(f"{name}: pickle.load")
    assert offenders == []
