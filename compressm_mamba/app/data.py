"""Data that ships offline, and loaders for the user's own files.

- ``stdlib``: CPython's standard-library sources as a byte-level corpus (vocabulary 256).
- ``digits``: scikit-learn's 8×8 digits read pixel by pixel (64 tokens of intensity 0..16), followed by
  a separator and the class token; the loss is on the class token only, and accuracy is read there.
- a local ``.txt`` file (bytes), a ``.json`` / ``.jsonl`` file with a ``text`` field, or a ``datasets``
  dataset saved with ``save_to_disk`` (with ``input_ids``, or ``text`` to be byte-encoded).
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

__all__ = ["stdlib_bytes", "byte_lm_dataset", "digits_dataset", "load_dataset_spec", "DIGITS_VOCAB", "DIGITS_CLASS0",
           "BUILTIN_DATA"]

BUILTIN_DATA = ("stdlib", "digits")
DIGITS_SEP = 17
DIGITS_CLASS0 = 18  # class k is token 18 + k
DIGITS_VOCAB = 28


def stdlib_bytes(n_bytes: int, offset: int = 0) -> bytes:
    """``n_bytes`` of CPython's standard-library ``*.py`` sources (sorted by name) after ``offset``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= n_bytes + offset:
            break
    blob = b"".join(chunks)[offset : offset + n_bytes]
    if len(blob) < n_bytes:
        raise ValueError(f"the standard library at {root} holds fewer than {n_bytes + offset} bytes")
    return blob


def byte_lm_dataset(blob: bytes, seq_len: int, n_seqs: int | None = None):
    """Non-overlapping byte sequences of ``seq_len`` for causal LM: a ``datasets.Dataset`` with
    ``input_ids`` and ``labels`` (identical; the model shifts them)."""
    from datasets import Dataset

    ids = torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()
    count = len(ids) // seq_len if n_seqs is None else min(n_seqs, len(ids) // seq_len)
    if count == 0:
        raise ValueError(f"the data holds {len(ids)} bytes, fewer than one sequence of {seq_len}")
    rows = ids[: count * seq_len].view(count, seq_len).tolist()
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def digits_dataset(split: str = "train", seed: int = 0):
    """sklearn digits as sequences: 64 pixels, a separator, the class token; loss on the class only.

    Split 80/20 with a fixed permutation (``seed``).  Returns a ``datasets.Dataset``.
    """
    from datasets import Dataset
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(0.8 * len(order))
    idx = order[:cut] if split == "train" else order[cut:]
    inputs, labels = [], []
    for i in idx:
        pixels = [int(v) for v in digits.data[i]]
        target = DIGITS_CLASS0 + int(digits.target[i])
        inputs.append(pixels + [DIGITS_SEP, target])
        # Causal LM: the label at position t is predicted from positions < t; only the class counts.
        labels.append([-100] * 65 + [target])
    return Dataset.from_dict({"input_ids": inputs, "labels": labels})


def _encode_texts(texts, seq_len):
    return byte_lm_dataset("\n".join(texts).encode("utf-8"), seq_len)


def load_dataset_spec(spec: str, seq_len: int, *, max_bytes: int = 2_000_000, offset: int = 0):
    """A training dataset from ``spec``: ``stdlib``, ``digits``, a .txt/.json/.jsonl file or a saved dataset dir.

    Raises FileNotFoundError for a missing path and ValueError for a file it cannot read.
    """
    if spec == "stdlib":
        return byte_lm_dataset(stdlib_bytes(max_bytes, offset), seq_len)
    if spec == "digits":
        return digits_dataset("train")
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"data {spec!r}: no such file or directory (built-in sets: {', '.join(BUILTIN_DATA)})")
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if "input_ids" in ds.column_names:
            return ds if "labels" in ds.column_names else ds.add_column("labels", ds["input_ids"])
        if "text" in ds.column_names:
            return _encode_texts(ds["text"], seq_len)
        raise ValueError(f"{spec}: a saved dataset needs an 'input_ids' or a 'text' column, has {ds.column_names}")
    if path.suffix == ".txt":
        return byte_lm_dataset(path.read_bytes()[:max_bytes], seq_len)
    if path.suffix in (".json", ".jsonl"):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()] if path.suffix == ".jsonl" else json.load(f)
        if not isinstance(records, list) or not all(isinstance(r, dict) and "text" in r for r in records):
            raise ValueError(f"{spec}: expected a list of objects with a 'text' field")
        return _encode_texts([r["text"] for r in records], seq_len)
    raise ValueError(f"{spec}: unsupported data file (use .txt, .json, .jsonl or a save_to_disk folder)")
