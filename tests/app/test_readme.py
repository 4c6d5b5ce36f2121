"""The README's Python snippets run as written, and its defaults table is CompressConfig's."""

import re
from pathlib import Path

import pytest

from compressm_mamba.config import CompressConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="the README's Trainer snippet needs accelerate")
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # the snippets write out/...
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    assert namespace["plain"].config.state_size == 4
    assert (tmp_path / "out" / "small" / "tokenizer.json").is_file()


def test_readme_defaults_table_is_compress_config():
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README.read_text(encoding="utf-8"), flags=re.M))
    defaults = CompressConfig().to_dict()
    assert set(rows) == set(defaults), set(rows) ^ set(defaults)
    for name, value in defaults.items():
        assert rows[name] == str(value), f"README says {name} = {rows[name]}, CompressConfig says {value}"
