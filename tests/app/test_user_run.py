"""A new user's run, end to end: a checkpoint saved with its tokenizer, fine-tuned on a text file with
the CLI, compressed, reloaded in plain transformers and generating (issue 13's "done when")."""

import json

import pytest
import torch

pytest.importorskip("transformers")  # the tokenizers come with it

from user_helpers import tiny_checkpoint  # noqa: E402

from compressm_mamba.app.cli import main  # noqa: E402

TRAIN = ["--steps", "8", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2", "--estimator", "mean_lti",
         "--attempts", "1", "--warmup-fraction", "0.5", "--calibration-batches", "2"]


def test_checkpoint_with_tokenizer_finetune_compress_reload_generate(tmp_path, licence_text, bpe_tokenizer, capsys):
    pytest.importorskip("accelerate", reason="the Trainer (finetune) needs accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tiny_checkpoint(tmp_path / "ckpt", bpe_tokenizer)
    run = tmp_path / "run"
    assert main(["finetune", "--checkpoint", ckpt, "--data", str(licence_text), "--out", str(run),
                 "--mode", "rank", "--rank", "6", *TRAIN]) == 0
    out = capsys.readouterr().out
    # what it did, in words: the tokenizer's vocabulary, tokens, sequences
    assert "GPL-3 (text file)" in out and "vocabulary 400" in out and "sequences of 32" in out
    report = json.loads((run / "report.json").read_text())
    assert set(report["state_sizes_after"].values()) == {6} and report["vocab_size"] == 400
    ids = bpe_tokenizer(licence_text.read_text(), add_special_tokens=False)["input_ids"]
    assert max(ids) > 255  # trained on the tokenizer's ids, not on bytes

    small = tmp_path / "small"
    assert main(["compress", str(run / "model"), "--out", str(small), "--data", str(licence_text), "--seq-len", "32",
                 "--batches", "2", "--mode", "rank", "--rank", "3", "--estimator", "mean_lti"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json",
                 "model.safetensors", "compressm_report.json"):
        assert (small / name).is_file(), name

    model = AutoModelForCausalLM.from_pretrained(str(small))  # plain transformers, not our loader
    tokenizer = AutoTokenizer.from_pretrained(str(small))
    assert model.config.state_size == 3 and len(tokenizer) == 400
    prompt = tokenizer("the GNU General Public License", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 6
    assert isinstance(tokenizer.decode(generated[0]), str)
    with torch.no_grad():
        assert torch.isfinite(model(**prompt).logits).all()
