"""Atomic, safetensors-only persistence: a crash in the middle of a save leaves the previous copy intact.

Every file the package writes goes to a temporary sibling first (same directory, hence the same
file system), is flushed and fsynced, and is then renamed over the target:

- ``save_pretrained_atomic(model, path)`` — a checkpoint directory.  The new directory is written
  next to ``path`` and swapped in with one ``renameat2(RENAME_EXCHANGE)`` on Linux (atomic: a reader
  sees the old directory or the new one, never a mix); elsewhere ``path`` is first renamed aside,
  and a crash between the two renames is repaired by the next save or by ``recover(path)``.
- ``write_json_atomic(obj, path)``, ``save_tensors_atomic(tensors, path)`` — single files, via
  ``os.replace``.

Files and directories get the modes a plain ``open`` / ``mkdir`` would give them (0666 / 0777 less the
umask), not ``tempfile``'s private 0600 / 0700.  ``save_pretrained_atomic`` can carry a tokenizer and
the input checkpoint's tokenizer and generation files into the new directory, so that every folder
we write is a complete checkpoint.  ``check_output_dir`` is what the command line asks before it
writes: an existing non-empty folder is refused unless the user said ``--overwrite``, and the input
is never replaced.

Weights are written as safetensors only (a pickled weights file in a checkpoint is refused), and
nothing here loads with pickle: ``state_sizes.load_safetensors_dir`` reads checkpoints back.
Leftovers of a killed save (``.<name>.tmp-<pid>-*``) are removed by the next save to the same path
once their process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile

import torch

__all__ = [
    "save_pretrained_atomic",
    "save_module_safetensors",
    "save_tensors_atomic",
    "write_json_atomic",
    "atomic_directory",
    "recover",
    "check_output_dir",
    "PICKLE_SUFFIXES",
    "CARRIED_FILES",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# What a checkpoint holds besides weights and config.json: its tokenizer and generation settings.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                 "chat_template.json", "generation_config.json")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


# ---- low level -------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _normal_mode(path: str, directory: bool) -> None:
    """Give a tempfile-made path the mode ``open`` / ``mkdir`` would have given it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. directories cannot be opened on some platforms
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _normal_modes(root: str) -> None:
    """Every folder and file under ``root`` (itself included) gets the mode ``mkdir`` / ``open`` would give."""
    for dirpath, _, filenames in os.walk(root):
        _normal_mode(dirpath, directory=True)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                _normal_mode(full, directory=False)


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath, directory=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL), errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"renameat2({a!r}, {b!r}, RENAME_EXCHANGE): {os.strerror(err)}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(path: str):
    """(kind, pid, full path) of temporary siblings of ``path`` left by saves: kind 'tmp' or 'old'."""
    parent, name = os.path.split(path)
    pattern = re.compile(r"^\." + re.escape(name) + r"\.(tmp|old)-(\d+)-")
    try:
        entries = os.listdir(parent or ".")
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        m = pattern.match(entry)
        if m:
            found.append((m.group(1), int(m.group(2)), os.path.join(parent, entry)))
    return found


def recover(path: str) -> bool:
    """Repair what a killed save left next to ``path``; True if a previous copy was put back.

    A save that died between renaming the old directory aside and renaming the new one in leaves
    ``path`` missing and ``.<name>.old-<pid>-*`` holding the previous checkpoint: it is renamed
    back.  Temporary directories and files of dead processes are removed.
    """
    path = os.path.abspath(path)
    restored = False
    for kind, pid, full in sorted(_siblings(path)):
        if _pid_alive(pid):
            continue
        if kind == "old" and not os.path.exists(path):
            os.rename(full, path)
            restored = True
        elif os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(full)
    return restored


def _replace_directory(tmp: str, path: str) -> None:
    parent = os.path.dirname(path)
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path)):
        raise FileExistsError(f"{path} exists and is not a directory: refusing to replace it")
    if not os.path.exists(path):
        os.rename(tmp, path)
        _fsync_path(parent, directory=True)
        return
    if _exchange(tmp, path):
        _fsync_path(parent, directory=True)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous contents
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-{os.getpid()}-", dir=parent)
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    _fsync_path(parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yield an empty temporary directory next to ``path``; on normal exit it replaces ``path``.

    On an exception the temporary directory is removed and ``path`` is untouched.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    recover(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-", dir=parent)
    try:
        yield tmp
        _normal_modes(tmp)  # tempfile's 0700, and writers (safetensors) that create files 0600
        _fsync_tree(tmp)
        _replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _atomic_file(path: str):
    """Yield a temporary file path next to ``path``; on normal exit it is fsynced and renamed onto ``path``."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-", dir=parent)
    os.close(fd)
    try:
        yield tmp
        _normal_mode(tmp, directory=False)  # after writing: a writer may have re-created the file
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(parent, directory=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# ---- public writers --------------------------------------------------------------------------------

def write_json_atomic(obj, path: str, **dump_kwargs) -> str:
    """Write ``obj`` as JSON to ``path`` atomically; returns ``path``."""
    dump_kwargs.setdefault("indent", 1)
    text = json.dumps(obj, **dump_kwargs)  # serialise first: an unserialisable object writes nothing
    with _atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.write("\n")
    return path


def save_tensors_atomic(tensors: dict, path: str, metadata: dict | None = None) -> str:
    """Write a dict of tensors as one safetensors file atomically; returns ``path``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with _atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def _is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _config_dict(model):
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    import dataclasses

    if dataclasses.is_dataclass(config):
        out = dataclasses.asdict(config)
        if isinstance(getattr(config, "compressm", None), dict):  # recorded by state_sizes.record_state_sizes
            out["compressm"] = config.compressm
        return out
    if isinstance(config, dict):
        return dict(config)
    return None


def save_module_safetensors(model: torch.nn.Module, directory: str) -> None:
    """Write any module's weights as ``model.safetensors`` (shared tensors stored once) and, when it has a
    JSON-able ``config``, ``config.json``; per-layer state sizes recorded on a config-less model go
    into the safetensors metadata."""
    from safetensors.torch import save_model

    os.makedirs(directory, exist_ok=True)
    metadata = {"format": "pt"}
    sizes = getattr(model, "_compressm_state_sizes", None)
    if sizes:
        metadata["compressm"] = json.dumps({"state_sizes": sizes})
    save_model(model, os.path.join(directory, "model.safetensors"), metadata=metadata)
    config = _config_dict(model)
    if config is not None:
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)


def _refuse_pickles(directory: str) -> None:
    for dirpath, _, filenames in os.walk(directory):
        pickled = [f for f in filenames if f.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise RuntimeError(
                f"refusing to publish a checkpoint with pickled files {pickled}: only safetensors are written "
                "(pickles execute code when loaded)"
            )


def check_output_dir(out: str, *, overwrite: bool = False, inputs=(), kind: str = "folder") -> None:
    """Refuse to write to ``out`` when that would lose the user's files.

    kind ``"folder"``: an existing non-empty folder is refused unless ``overwrite``, an existing file
    always; kind ``"file"``: an existing file is refused unless ``overwrite``, a folder always.
    ``out`` is refused even with ``overwrite`` when it is, contains or lies inside one of ``inputs``
    (the checkpoint being read).  Raises FileExistsError saying what to do.
    """
    real = os.path.realpath(out)
    for given in inputs:
        if given is None:
            continue
        source = os.path.realpath(given)
        if real == source or real.startswith(source + os.sep) or source.startswith(real + os.sep):
            raise FileExistsError(f"--out {out!r} would replace the input {given!r}: choose another folder "
                                  "(the input is never overwritten, not even with --overwrite)")
    if kind == "file":
        if os.path.isdir(out):
            raise FileExistsError(f"--out {out!r} is a folder; give a file name")
        if os.path.lexists(out) and not overwrite:
            raise FileExistsError(f"--out {out!r} exists: choose a new name, or pass --overwrite to replace it")
        return
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out!r} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"--out {out!r} exists and is not empty: choose a new folder, or pass --overwrite "
                              "to replace what is there")


def _carry(tmp: str, tokenizer, carry_from: str | None) -> None:
    """Copy the input checkpoint's tokenizer / generation files (``CARRIED_FILES``) and save ``tokenizer``."""
    if carry_from is not None:
        for name in CARRIED_FILES:
            source = os.path.join(carry_from, name)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(tmp, name))  # copyfile: the new file gets normal modes
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def save_pretrained_atomic(model: torch.nn.Module, path: str, *, tokenizer=None, carry_from: str | None = None,
                           **kwargs) -> str:
    """Save ``model`` to the directory ``path`` so that a crash at any point leaves the previous ``path``.

    Hugging Face models go through ``model.save_pretrained`` (``kwargs`` are passed on; transformers
    writes safetensors); any other module through ``save_module_safetensors``.  ``carry_from``: a
    checkpoint folder whose tokenizer and generation files (``CARRIED_FILES``) are copied in;
    ``tokenizer``: saved into the folder too (after the copies).  The result is refused if it holds
    a pickled weights file.  With ``is_main_process=False`` nothing is written (the Trainer convention
    under data parallelism).  Returns ``path``.
    """
    if kwargs.get("safe_serialization") is False:
        raise ValueError("save_pretrained_atomic writes safetensors only: safe_serialization=False is refused")
    if not kwargs.get("is_main_process", True):
        return os.fspath(path)
    path = os.fspath(path)
    with atomic_directory(path) as tmp:
        if _is_hf_model(model):
            model.save_pretrained(tmp, **kwargs)
        else:
            if kwargs:
                raise TypeError(f"save_pretrained_atomic: {type(model).__name__} is not a transformers model; "
                                f"unexpected keyword arguments {sorted(kwargs)}")
            save_module_safetensors(model, tmp)
        _carry(tmp, tokenizer, carry_from)
        _refuse_pickles(tmp)
    return path
