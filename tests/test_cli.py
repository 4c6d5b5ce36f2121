"""compressm-mamba: finetune -> analyze -> compress on tiny settings, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from compressm_mamba.app.cli import main  # noqa: E402


def run(args):
    return main(args)


def needs(*modules, why):
    for name in modules:
        pytest.importorskip(name, reason=f"{why} needs {name}")


@pytest.mark.slow  # trains, analyzes and compresses through the Trainer
def test_finetune_analyze_compress_round_trip(tmp_path, capsys):
    needs("datasets", "accelerate", "matplotlib", why="finetune (data, Trainer, plots)")
    out = tmp_path / "run"
    assert run(["finetune", "--preset", "tiny", "--data", "stdlib", "--out", str(out), "--steps", "12",
                "--seq-len", "32", "--batch-size", "2", "--mode", "rank", "--rank", "6", "--estimator", "frozen",
                "--attempts", "1", "--warmup-fraction", "0.25", "--calibration-batches", "2"]) == 0
    text = capsys.readouterr().out
    assert "N before" in text and "cut at step 3 of 12" in text and "tokens/s" in text and "plots:" in text
    report = json.loads((out / "report.json").read_text())
    assert set(report["state_sizes_after"].values()) == {6}
    assert report["tokens_per_s_after_cut"] and report["loss_after_cut"]
    assert (out / "loss.png").stat().st_size > 0 and (out / "hsv.png").stat().st_size > 0
    assert (out / "model" / "model.safetensors").exists()
    # a complete checkpoint: the byte tokenizer the preset was trained with, and the generation config
    from transformers import AutoTokenizer

    assert (out / "model" / "generation_config.json").is_file()
    assert AutoTokenizer.from_pretrained(str(out / "model"))("é", add_special_tokens=False)["input_ids"] == [195, 169]

    assert run(["analyze", str(out / "model"), "--out", str(tmp_path / "spectra.png"), "--seq-len", "32",
                "--batches", "2", "--mode", "rank", "--rank", "3"]) == 0
    text = capsys.readouterr().out
    assert "backbone.layers.0.mixer" in text and "not changed" in text
    assert (tmp_path / "spectra.png").stat().st_size > 0

    assert run(["compress", str(out / "model"), "--out", str(tmp_path / "small"), "--seq-len", "32",
                "--batches", "2", "--mode", "rank", "--rank", "3"]) == 0
    from compressm_mamba import from_pretrained

    assert from_pretrained(str(tmp_path / "small")).config.state_size == 3


@pytest.mark.slow  # the Trainer on the digits task
def test_digits_task_trains(tmp_path, capsys):
    needs("datasets", "accelerate", "sklearn", why="the digits task (data, Trainer, load_digits)")
    assert run(["finetune", "--preset", "tiny", "--data", "digits", "--out", str(tmp_path), "--steps", "4",
                "--batch-size", "8", "--no-compress"]) == 0
    assert "no cut" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["finetune", "--preset", "huge", "--steps", "1"], "unknown preset 'huge'"),
        (["finetune", "--data", "missing.txt", "--steps", "1"], "data 'missing.txt': no such file"),
        (["analyze", "no/such/checkpoint"], "checkpoint 'no/such/checkpoint' is not a directory"),
        (["finetune", "--preset", "tiny", "--mode", "shrink", "--steps", "1"], "CompressConfig.mode must be one of"),
    ],
)
def test_errors_are_one_line(args, message, tmp_path, capsys):
    if "unknown preset" in message:
        needs("datasets", why="finetune loads its data before it builds the preset, so this error")
    assert run(args + ([] if args[0] != "finetune" else ["--out", str(tmp_path)])) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "compressm-mamba")
    if not os.path.exists(script):
        pytest.skip("the console script appears after `pip install -e .` (make test reinstalls)")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "finetune" in proc.stdout
