"""Training with in-training compression: model presets, the ``finetune`` job, its report and plots.

``finetune(...)`` builds (or loads) a Mamba / Mamba2 model, trains it with the Hugging Face Trainer
and ``CompreSSMCallback``, and writes to ``out``: the checkpoint (``model/``: safetensors, config, the
tokenizer and generation config — a folder plain transformers loads), ``report.json`` (per-layer N
before/after, loss and tokens/s before and after the cut, the cut reports) and PNG plots (loss vs
step and vs wall time with the cuts marked; importance spectra per layer at every cut).

Tokenizer: a checkpoint's own (or ``tokenizer=``); models built from a preset use the byte tokenizer
(``data.byte_tokenizer``) unless ``tokenizer=`` names another, and get its vocabulary size.  A
tokenizer or data with more token ids than the model's embedding is an error before training.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field

import torch

__all__ = ["PRESETS", "build_model", "finetune", "TimingCallback", "FinetuneResult"]

# Size presets built from config (no download).  vocab is set from the data.
PRESETS = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, state_size=16),
    "demo": dict(hidden_size=32, num_hidden_layers=2, state_size=128),
    "small": dict(hidden_size=64, num_hidden_layers=4, state_size=128),
    "base": dict(hidden_size=768, num_hidden_layers=24, state_size=128),
}


def build_model(preset: str, vocab_size: int, *, arch: str = "mamba", state_size: int | None = None, seed: int = 0,
                special_ids: dict | None = None, hidden_size: int | None = None, num_hidden_layers: int | None = None):
    """A freshly initialised ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` of a size preset (``state_size``,
    ``hidden_size``, ``num_hidden_layers`` override the preset's).

    special_ids: ``pad_token_id`` / ``bos_token_id`` / ``eos_token_id`` (default 0 each: the byte
    tokenizer's NUL), e.g. from the tokenizer the model will be trained with.
    """
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    if arch not in ("mamba", "mamba2"):
        raise ValueError(f"unknown architecture {arch!r}; use 'mamba' or 'mamba2'")
    size = dict(PRESETS[preset])
    for key, value in (("state_size", state_size), ("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers)):
        if value is not None:
            size[key] = value
    torch.manual_seed(seed)
    ids = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
    ids.update({k: v for k, v in (special_ids or {}).items() if v is not None})
    common = dict(vocab_size=vocab_size, **ids, **size)
    if arch == "mamba":
        return MambaForCausalLM(MambaConfig(**common))
    head_dim = 16
    heads = 2 * size["hidden_size"] // head_dim
    return Mamba2ForCausalLM(Mamba2Config(head_dim=head_dim, num_heads=heads, n_groups=1, expand=2, chunk_size=64,
                                          **common))


@dataclass
class FinetuneResult:
    out: str
    report: dict
    plots: list = field(default_factory=list)


def _transformers_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class TimingCallback(_transformers_callback_base()):
    """Records, per optimizer step: wall time, seconds, and whether the step fed Gramian collection.

    collecting: optional callable, True while the step running feeds the collector (e.g.
    ``CompreSSMCallback.collecting``); such steps do extra work, and speed comparisons leave them out.
    Put this callback after the ``CompreSSMCallback`` (it starts collection in its ``on_step_begin``).
    """

    def __init__(self, tokens_per_step: int, collecting=None):
        self.tokens_per_step = tokens_per_step
        self.collecting = collecting
        self.steps = []  # dicts: step, wall, seconds, collecting
        self._t0 = self._last = None
        self._collecting_now = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = self._last = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._collecting_now = bool(self.collecting and self.collecting())

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.steps.append({"step": state.global_step, "wall": now - self._t0, "seconds": now - self._last,
                           "collecting": self._collecting_now})
        self._last = now

    def tokens_per_s(self, first: int, last: int, *, plain: bool = True) -> float | None:
        """Mean tokens/s over steps first..last (inclusive), or None when there are none.

        plain: leave out the steps that fed Gramian collection (they also estimate Gramians).
        """
        chosen = [s["seconds"] for s in self.steps
                  if first <= s["step"] <= last and not (plain and s.get("collecting"))]
        return None if not chosen else self.tokens_per_step * len(chosen) / sum(chosen)


def _mean_loss(history, first, last):
    values = [e["loss"] for e in history if "loss" in e and first <= e["step"] <= last]
    return None if not values else sum(values) / len(values)


def finetune(
    out: str,
    *,
    data: str = "stdlib",
    preset: str | None = "demo",
    checkpoint: str | None = None,
    arch: str = "mamba",
    config=None,
    seq_len: int = 256,
    batch_size: int = 4,
    max_steps: int = 200,
    learning_rate: float = 3e-3,
    max_bytes: int = 2_000_000,
    seed: int = 0,
    backend: str = "auto",
    plots: bool = True,
    quiet: bool = False,
    tokenizer=None,
    text_column: str | None = None,
    overwrite: bool = False,
    mqar: dict | None = None,
) -> FinetuneResult:
    """Train ``preset`` (or fine-tune ``checkpoint``) on ``data`` with ``CompreSSMCallback(config)``.

    config=None trains without compression.  Mamba1 mixers are swapped for the drop-in mixer (our
    scan kernels, ``backend``).  tokenizer: a tokenizer, a folder holding one, or ``"bytes"``
    (default: the checkpoint's own; bytes for a preset).  text_column: the column of a table or
    dataset holding the text (``data.read_texts``).  ``out`` must be new or empty unless
    ``overwrite``, and never the checkpoint read.  Returns the output folder, the report dict and
    the plot paths.  ``mqar``: the knobs of ``data="mqar"`` (pairs, vocab, n; ``data.MQAR_DEFAULTS``); the
    report then holds the held-out recall accuracy (512 sequences from another seed).
    """
    from transformers import Trainer, TrainingArguments, logging as hf_logging

    from ..cut.state_sizes import from_pretrained
    from ..models.registry import find_mixers
    from ..models.drop_in import replace_mixers_
    from ..persistence import check_output_dir, save_pretrained_atomic, write_json_atomic
    from ..training.callback import CompreSSMCallback
    from .data import MQAR_DEFAULTS, PRETOKENIZED, load_dataset_spec

    say = (lambda *a: None) if quiet else print
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r}: not a directory")
    check_output_dir(out, overwrite=overwrite, inputs=[checkpoint])
    if checkpoint is None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    hf_logging.set_verbosity_error()
    tokenizer = resolve_tokenizer(tokenizer, checkpoint, data)
    mqar = {**MQAR_DEFAULTS, **(mqar or {}), "seed": seed} if data == "mqar" else None
    dataset = load_dataset_spec(data, seq_len, tokenizer=tokenizer, text_column=text_column, max_bytes=max_bytes,
                                mqar=mqar)
    say(dataset.summary)
    if checkpoint is not None:
        model = from_pretrained(checkpoint)
    else:
        vocab = (mqar["vocab"] if mqar else PRETOKENIZED[data]) if tokenizer is None else len(tokenizer)
        special = {} if tokenizer is None else {k: getattr(tokenizer, k, None)
                                                for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        model = build_model(preset, vocab, arch=arch, seed=seed, special_ids=special)
    check_vocabulary(model, tokenizer, dataset)
    say(f"model: {checkpoint or f'preset {preset} ({arch})'}, vocabulary {model.get_input_embeddings().num_embeddings}")
    adapters = find_mixers(model)
    sizes_before = {a.name: a.state_size for a in adapters}
    try:
        replace_mixers_(model, backend=backend)
    except TypeError:
        pass  # Mamba2: transformers' own SSD scan (see compressm_mamba.models.drop_in)

    tokens_per_step = batch_size * len(dataset[0]["input_ids"])
    compressor = None if config is None else CompreSSMCallback(config)
    timing = TimingCallback(tokens_per_step, collecting=None if compressor is None else lambda: compressor.collecting)
    callbacks = [timing] if compressor is None else [compressor, timing]  # timing after: it reads collecting
    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"), max_steps=max_steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, max_steps // 10),
        logging_steps=max(1, max_steps // 50), report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
        disable_tqdm=quiet, seed=seed, data_seed=seed, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.train()

    cut_steps = [] if compressor is None else [r.step for r in compressor.reports]
    cut_step, last_cut = (cut_steps[0], cut_steps[-1]) if cut_steps else (None, None)
    history = trainer.state.log_history
    sizes_after = {a.name: a.state_size for a in find_mixers(model)}
    report = {
        "data": data, "preset": preset, "checkpoint": checkpoint, "arch": arch, "max_steps": max_steps,
        "seq_len": seq_len, "batch_size": batch_size, "config": None if config is None else config.to_dict(),
        "data_summary": dataset.summary, "tokenizer": None if tokenizer is None else getattr(tokenizer, "name_or_path", ""),
        "vocab_size": model.get_input_embeddings().num_embeddings,
        "state_sizes_before": sizes_before, "state_sizes_after": sizes_after, "cut_step": cut_step,
        "cut_steps": cut_steps,
        "loss_before_cut": _mean_loss(history, 1, cut_step) if cut_step else None,
        "loss_after_cut": _mean_loss(history, last_cut + 1, max_steps) if cut_step else None,
        "final_loss": _mean_loss(history, max(1, max_steps - max_steps // 10), max_steps),
        # the first steps include one-off warm-up costs, the step of a cut the cut itself, and the steps
        # feeding Gramian collection the estimation: none of them count (steps marked "collecting")
        "tokens_per_s_before_cut": timing.tokens_per_s(2, cut_step - 1) if cut_step else None,
        "tokens_per_s_after_cut": timing.tokens_per_s(last_cut + 1, max_steps) if cut_step else None,
        "tokens_per_s": timing.tokens_per_s(2, max_steps),
        "train_seconds": timing.steps[-1]["wall"] if timing.steps else None,
        "cuts": [] if compressor is None else [r.to_dict() for r in compressor.reports],
        "history": [e for e in history if "loss" in e],
        "step_times": timing.steps,
    }
    if mqar:
        from .mqar import HELD_OUT_SEED_OFFSET, MQARSpec, mqar_accuracy, mqar_dataset

        held_out = mqar_dataset(512, MQARSpec(mqar["pairs"], seq_len, mqar["vocab"]), seed + HELD_OUT_SEED_OFFSET)
        report["mqar_accuracy"], report["mqar_held_out_loss"] = mqar_accuracy(model, held_out)
    os.makedirs(out, exist_ok=True)
    # safetensors + config + tokenizer + generation config, renamed into place: a complete checkpoint
    save_pretrained_atomic(model, os.path.join(out, "model"), tokenizer=tokenizer)
    write_json_atomic(report, os.path.join(out, "report.json"), indent=1)
    paths = []
    if plots and importlib.util.find_spec("matplotlib") is None:
        say("plots skipped: matplotlib is not installed (pip install matplotlib)")
        plots = False
    if plots:
        from .plots import plot_cut_spectra, plot_training

        paths.append(plot_training(report, os.path.join(out, "loss.png")))
        if compressor and compressor.reports:
            paths.append(plot_cut_spectra(compressor.reports, os.path.join(out, "hsv.png")))
    return FinetuneResult(out, report, paths)


def resolve_tokenizer(tokenizer, checkpoint: str | None, data: str):
    """The tokenizer a run uses: the one given (object, folder or ``"bytes"``), else the checkpoint's,
    else the byte tokenizer for a preset; None for the built-in sets that are token ids already
    (``data.PRETOKENIZED``: ``digits``).

    A checkpoint without tokenizer files needs ``tokenizer=`` (ValueError saying so): guessing bytes
    for a model trained on another vocabulary trains it on the wrong ids.
    """
    from .data import PRETOKENIZED, byte_tokenizer, has_tokenizer, load_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if data in PRETOKENIZED:
        return None
    if checkpoint is None:
        return byte_tokenizer()
    if has_tokenizer(checkpoint):
        return load_tokenizer(checkpoint)
    raise ValueError(f"checkpoint {checkpoint!r} has no tokenizer files: pass --tokenizer FOLDER (the tokenizer it "
                     "was trained with), or --tokenizer bytes if it was trained on UTF-8 bytes")


def check_vocabulary(model, tokenizer, dataset) -> None:
    """ValueError, before any training, when the tokenizer or the data has ids the model cannot embed."""
    rows = model.get_input_embeddings().num_embeddings
    if tokenizer is not None and len(tokenizer) > rows:
        raise ValueError(f"vocabulary mismatch: the tokenizer has {len(tokenizer):,} tokens but the model embeds "
                         f"{rows:,} (config.vocab_size); use the tokenizer the model was trained with (--tokenizer)")
    if dataset.vocab_needed > rows:
        raise ValueError(f"vocabulary mismatch: the data holds token id {dataset.vocab_needed - 1:,} but the model "
                         f"embeds {rows:,} ids (config.vocab_size)")
