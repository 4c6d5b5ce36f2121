"""Real data: any text file, tables and dataset folders through `datasets`, a checkpoint's tokenizer,
packing, and what happens without `datasets` installed."""

import builtins
import json

import pytest
import torch

pytest.importorskip("transformers")  # the tokenizers come with it

from compressm_mamba.app.data import byte_tokenizer, load_dataset_spec, pack  # noqa: E402


def test_text_file_of_any_name_is_tokenized_with_the_given_tokenizer_and_packed(licence_text, bpe_tokenizer):
    ds = load_dataset_spec(str(licence_text), 32, tokenizer=bpe_tokenizer)
    ids = bpe_tokenizer(licence_text.read_text(), add_special_tokens=False)["input_ids"]
    count = len(ids) // 32
    assert ds.input_ids.shape == (count, 32)
    assert torch.equal(ds.input_ids.flatten(), torch.tensor(ids[: count * 32]))
    assert f"{len(ids):,} tokens" in ds.summary and f"{count:,} sequences of 32" in ds.summary
    assert "vocabulary 400" in ds.summary


def test_bytes_by_default_and_the_byte_tokenizer_round_trips(tmp_path):
    path = tmp_path / "notes"
    path.write_text("héllo wörld\n" * 10, encoding="utf-8")
    ds = load_dataset_spec(str(path), 8)
    assert ds.input_ids.flatten().tolist() == list(path.read_bytes())[: len(ds) * 8]
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded("héllo", add_special_tokens=False)["input_ids"] == list("héllo".encode())
    assert loaded.decode(list("wörld".encode())) == "wörld"


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "saved", "folder"])
def test_tables_and_dataset_folders_with_a_text_column(kind, tmp_path, bpe_tokenizer):
    pytest.importorskip("datasets")
    from datasets import Dataset

    rows = [{"id": i, "body": f"document {i}: the licence grants you the freedom to share {i}"} for i in range(40)]
    ds = Dataset.from_list(rows)
    target = {"jsonl": tmp_path / "d.jsonl", "csv": tmp_path / "d.csv", "parquet": tmp_path / "d.parquet",
              "saved": tmp_path / "saved", "folder": tmp_path / "folder"}[kind]
    if kind == "jsonl":
        target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        ds.to_csv(str(target))
    elif kind == "parquet":
        ds.to_parquet(str(target))
    elif kind == "saved":
        ds.save_to_disk(str(target))
    else:
        target.mkdir()
        ds.to_json(str(target / "part-0.jsonl"))
    with pytest.raises(ValueError, match="--text-column"):
        load_dataset_spec(str(target), 16, tokenizer=bpe_tokenizer, text_column="missing")
    packed = load_dataset_spec(str(target), 16, tokenizer=bpe_tokenizer, text_column="body")
    docs = bpe_tokenizer([r["body"] for r in rows], add_special_tokens=False)["input_ids"]
    expected, _, _ = pack(docs, 16, bpe_tokenizer.eos_token_id)
    assert torch.equal(packed.input_ids, expected)
    assert "column 'body'" in packed.summary


def test_without_datasets_text_works_and_tables_name_the_package(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    text = tmp_path / "README"
    text.write_text("plain text needs nothing but the tokenizer\n" * 4)
    assert len(load_dataset_spec(str(text), 16)) == len(text.read_bytes()) // 16
    table = tmp_path / "t.csv"
    table.write_text("text\nhello\n")
    with pytest.raises(ImportError, match="pip install datasets"):
        load_dataset_spec(str(table), 16)


def test_binary_and_too_short_files_are_clear_errors(tmp_path):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_dataset_spec(str(blob), 16)
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ValueError, match="fewer than one sequence of 16"):
        load_dataset_spec(str(short), 16)
