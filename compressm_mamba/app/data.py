"""Training data: the built-in sets, the user's own files and dataset folders, tokenized and packed.

- ``stdlib``: CPython's standard-library sources (ships with Python), tokenized like any text.
- ``digits``: scikit-learn's 8×8 digits read pixel by pixel (64 tokens of intensity 0..16), followed
  by a separator and the class token; already token ids (vocabulary 28), the loss on the class only.
- ``mqar``: multi-query associative recall generated offline (``app.mqar``; knobs ``mqar=dict(pairs=,
  vocab=, n=, seed=)``, length ``seq_len``); token ids, the loss on the answer positions only.
- a text file of any name (UTF-8; read directly, ``datasets`` not needed), a ``.json`` / ``.jsonl`` /
  ``.csv`` / ``.parquet`` / ``.arrow`` file, a folder saved with ``save_to_disk``, or a folder of such
  data files — these through ``datasets`` (``pip install datasets``), taking the column ``text_column``
  (default: ``text``, or the only string column), or an ``input_ids`` column as token ids.

Text is tokenized with the given tokenizer (a ``transformers`` tokenizer: the checkpoint's own, or
``byte_tokenizer()``, whose ids are the UTF-8 byte values), documents are joined with the
tokenizer's end-of-sequence token, and the token stream is cut into non-overlapping sequences of
``seq_len`` (``pack``).  ``load_dataset_spec`` returns a ``TokenDataset`` whose ``summary`` says what
was done (characters, tokens, sequences, vocabulary).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

__all__ = ["stdlib_bytes", "byte_lm_dataset", "digits_dataset", "load_dataset_spec", "TokenDataset", "pack",
           "byte_tokenizer", "load_tokenizer", "has_tokenizer", "read_texts", "DIGITS_VOCAB", "DIGITS_CLASS0",
           "BUILTIN_DATA", "PRETOKENIZED", "DATASETS_SUFFIXES", "MQAR_DEFAULTS"]

BUILTIN_DATA = ("stdlib", "digits", "mqar")
MQAR_DEFAULTS = {"pairs": 8, "vocab": 64, "n": 4096, "seed": 0}  # --data mqar's knobs (app/mqar.py)
DIGITS_SEP = 17
DIGITS_CLASS0 = 18  # class k is token 18 + k
DIGITS_VOCAB = 28
# Built-in sets that are token ids already (no tokenizer): name -> vocabulary size a model needs.
PRETOKENIZED = {"digits": DIGITS_VOCAB, "mqar": MQAR_DEFAULTS["vocab"]}
# File suffix -> the `datasets` builder that reads it; any other file is read as plain UTF-8 text.
DATASETS_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                     ".arrow": "arrow"}
# Files that make a folder a tokenizer (transformers' AutoTokenizer reads any of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class TokenDataset(torch.utils.data.Dataset):
    """Packed token sequences for causal LM training: item i is ``{"input_ids", "labels"}`` (seq_len,) int64.

    input_ids, labels: (count, seq_len) int64 (labels equal input_ids for language modelling — the
    model shifts them — or -100 where no loss is wanted).  ``summary``: one line saying what was read
    and how it was tokenized; ``vocab_needed``: the largest id + 1, checked against the model.
    """

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, summary: str = ""):
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"TokenDataset needs a non-empty (count, seq_len) tensor, got {tuple(input_ids.shape)}")
        self.input_ids = input_ids.long()
        self.labels = self.input_ids if labels is None else labels.long()
        self.summary = summary

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def vocab_needed(self) -> int:
        return int(self.input_ids.max()) + 1

    def batches(self, batch_size: int, count: int) -> list:
        """The first ``count`` batches of ``batch_size`` sequences as dicts of input_ids (calibration)."""
        n = min(len(self), count * batch_size)
        return [{"input_ids": self.input_ids[i : i + batch_size]} for i in range(0, n, batch_size)]


# ---- tokenizers ------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def byte_tokenizer():
    """A ``transformers`` fast tokenizer whose token ids are the UTF-8 byte values (vocabulary 256).

    What preset models are trained with; saved with their checkpoints like any tokenizer, so the
    output loads and generates in plain transformers.  Built offline (BPE over the 256 byte symbols,
    no merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # Byte 0 doubles as end of text and padding (what the presets' configs say).
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=table[0], pad_token=table[0], bos_token=table[0])


def has_tokenizer(path) -> bool:
    """Whether the folder ``path`` holds tokenizer files."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_tokenizer(spec: str):
    """A tokenizer from ``spec``: ``"bytes"`` (``byte_tokenizer()``) or a local folder with tokenizer files."""
    if spec == "bytes":
        return byte_tokenizer()
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"tokenizer {spec!r}: not a folder (give a checkpoint or tokenizer folder, or 'bytes')")
    if not has_tokenizer(spec):
        raise FileNotFoundError(f"tokenizer {spec!r}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in it")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def tokenizer_name(tokenizer) -> str:
    if getattr(tokenizer, "name_or_path", ""):
        return f"{tokenizer.name_or_path}, vocabulary {len(tokenizer)}"
    return f"vocabulary {len(tokenizer)}"


# ---- reading ---------------------------------------------------------------------------------------

def _need_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {what} needs the `datasets` package (pip install datasets); plain text files "
                          "and the built-in sets work without it") from None
    return datasets


def _split(ds, spec: str):
    """The 'train' split of a DatasetDict (or its only split)."""
    if hasattr(ds, "column_names") and isinstance(ds.column_names, list):
        return ds
    splits = list(ds.keys())
    if "train" in splits:
        return ds["train"]
    if len(splits) == 1:
        return ds[splits[0]]
    raise ValueError(f"data {spec!r} has splits {splits} and none is 'train'")


def _read_with_datasets(path: Path, spec: str):
    """A ``datasets.Dataset`` from a data file, a ``save_to_disk`` folder or a folder of data files."""
    datasets = _need_datasets(f"{spec!r}")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _split(datasets.load_from_disk(str(path)), spec)
        return _split(datasets.load_dataset(str(path)), spec)
    builder = DATASETS_SUFFIXES[path.suffix.lower()]
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)


def _text_column(ds, text_column: str | None, spec: str) -> str:
    columns = list(ds.column_names)
    if text_column is not None:
        if text_column not in columns:
            raise ValueError(f"data {spec!r}: no column {text_column!r} (--text-column); columns: {columns}")
        return text_column
    if "text" in columns:
        return "text"
    strings = [c for c in columns if getattr(ds.features[c], "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise ValueError(f"data {spec!r}: which column holds the text? pass --text-column (columns: {columns})")


def read_texts(spec: str, text_column: str | None = None):
    """(texts, token id rows or None, description) of a file or folder.

    A file whose suffix ``datasets`` reads (``DATASETS_SUFFIXES``) and any folder go through
    ``datasets``; any other file is read as UTF-8 text (one document).  A dataset with an
    ``input_ids`` column (and no ``text_column`` asked for) gives its rows as token ids instead.
    Raises FileNotFoundError for a missing path, ValueError for data it cannot use.
    """
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"data {spec!r}: no such file or directory (built-in sets: {', '.join(BUILTIN_DATA)})")
    if path.is_file() and path.suffix.lower() not in DATASETS_SUFFIXES:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"data {spec!r}: not UTF-8 text ({err.reason} at byte {err.start}); text files, "
                             f"{', '.join(sorted(DATASETS_SUFFIXES))} files and dataset folders are read") from None
        if "\x00" in text:
            raise ValueError(f"data {spec!r}: holds NUL bytes, not a text file")
        return [text], None, f"{path.name} (text file)"
    ds = _read_with_datasets(path, spec)
    if text_column is None and "input_ids" in ds.column_names:
        return None, [list(map(int, row)) for row in ds["input_ids"]], f"{path.name} (input_ids column)"
    column = _text_column(ds, text_column, spec)
    texts = [t for t in ds[column] if isinstance(t, str) and t]
    if not texts:
        raise ValueError(f"data {spec!r}: column {column!r} holds no text")
    return texts, None, f"{path.name} (column {column!r}, {len(texts)} rows)"


# ---- tokenizing and packing ------------------------------------------------------------------------

def is_byte_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` maps text to its UTF-8 bytes (``byte_tokenizer()``, also after a save and load)."""
    if len(tokenizer) != 256:
        return False
    table = _bytes_to_unicode()
    return tokenizer.get_vocab() == {table[b]: b for b in range(256)}


def tokenize(texts: list, tokenizer) -> list:
    """Token id lists of ``texts`` (no special tokens added; documents are joined by ``pack``).

    The byte tokenizer is applied directly (``str.encode``): the same ids, without running BPE over
    megabytes of single-symbol words.
    """
    if is_byte_tokenizer(tokenizer):
        return [list(t.encode("utf-8")) for t in texts]
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def pack(documents: list, seq_len: int, separator: int | None = None) -> tuple:
    """Join token id lists (``separator`` between documents) and cut into non-overlapping sequences.

    Returns (ids (count, seq_len) int64, tokens in the stream, tokens dropped at the end).
    """
    stream = []
    for i, doc in enumerate(documents):
        if i and separator is not None:
            stream.append(separator)
        stream.extend(doc)
    count = len(stream) // seq_len
    if count == 0:
        raise ValueError(f"the data holds {len(stream)} tokens, fewer than one sequence of {seq_len} "
                         "(lower --seq-len or give more text)")
    ids = torch.tensor(stream[: count * seq_len], dtype=torch.int64).view(count, seq_len)
    return ids, len(stream), len(stream) - count * seq_len


def _packed(documents, seq_len, tokenizer, described: str, characters: int | None) -> TokenDataset:
    separator = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    ids, total, dropped = pack(documents, seq_len, separator)
    what = f"{characters:,} characters -> " if characters is not None else ""
    vocab = f"tokenizer {tokenizer_name(tokenizer)}" if tokenizer is not None else "token ids as given"
    summary = (f"data {described}: {what}{total:,} tokens ({vocab}) -> {ids.shape[0]:,} sequences of {seq_len}"
               + (f" ({dropped:,} tokens left over)" if dropped else ""))
    return TokenDataset(ids, summary=summary)


# ---- the built-in sets -----------------------------------------------------------------------------

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
    ``input_ids`` and ``labels`` (identical; the model shifts them).  (The benchmark scripts' form.)"""
    from datasets import Dataset

    ids = torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()
    count = len(ids) // seq_len if n_seqs is None else min(n_seqs, len(ids) // seq_len)
    if count == 0:
        raise ValueError(f"the data holds {len(ids)} bytes, fewer than one sequence of {seq_len}")
    rows = ids[: count * seq_len].view(count, seq_len).tolist()
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def _digits_rows(split: str, seed: int) -> tuple:
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
    return inputs, labels


def digits_dataset(split: str = "train", seed: int = 0):
    """sklearn digits as sequences: 64 pixels, a separator, the class token; loss on the class only.

    Split 80/20 with a fixed permutation (``seed``).  Returns a ``datasets.Dataset``.
    """
    from datasets import Dataset

    inputs, labels = _digits_rows(split, seed)
    return Dataset.from_dict({"input_ids": inputs, "labels": labels})


def load_dataset_spec(spec: str, seq_len: int, *, tokenizer=None, text_column: str | None = None,
                      max_bytes: int = 2_000_000, offset: int = 0, mqar: dict | None = None) -> TokenDataset:
    """A packed training set from ``spec``: ``stdlib``, ``digits``, a file or a dataset folder.

    tokenizer: turns text into ids (default: ``byte_tokenizer()``); not used for ``digits`` and
    ``input_ids`` columns.  max_bytes / offset: how much of ``stdlib`` (user files are read whole).
    The returned ``TokenDataset.summary`` says what was read, how many tokens and sequences.
    Raises FileNotFoundError for a missing path, ValueError for data it cannot use, ImportError
    naming the package to install.
    """
    if spec == "mqar":
        from .mqar import MQARSpec, mqar_tensors

        k = {**MQAR_DEFAULTS, **(mqar or {})}
        ids, labels = mqar_tensors(k["n"], MQARSpec(k["pairs"], seq_len, k["vocab"]), k["seed"])
        return TokenDataset(ids, labels, summary=f"data mqar: {k['n']:,} sequences of {seq_len} token ids, {k['pairs']} "
                                                 f"key-value pairs each (vocabulary {k['vocab']}, seed {k['seed']}), "
                                                 "loss on the answers")
    if spec == "digits":
        inputs, labels = _digits_rows("train", 0)
        return TokenDataset(torch.tensor(inputs), torch.tensor(labels),
                            summary=f"data digits: {len(inputs):,} images as sequences of 66 token ids "
                                    f"(vocabulary {DIGITS_VOCAB}), loss on the class token")
    tokenizer = byte_tokenizer() if tokenizer is None else tokenizer
    if spec == "stdlib":
        blob = stdlib_bytes(max_bytes, offset)
        # bytes straight to ids for the byte tokenizer (a cut inside a UTF-8 character stays exact)
        docs = [list(blob)] if is_byte_tokenizer(tokenizer) else tokenize([blob.decode("utf-8", "replace")], tokenizer)
        return _packed(docs, seq_len, tokenizer, "stdlib (CPython's sources)", len(blob.decode("utf-8", "replace")))
    texts, rows, described = read_texts(spec, text_column)
    if rows is not None:
        return _packed(rows, seq_len, None, described, None)
    return _packed(tokenize(texts, tokenizer), seq_len, tokenizer, described, sum(map(len, texts)))
