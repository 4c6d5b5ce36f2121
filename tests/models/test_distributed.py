"""CompreSSMCallback under DistributedDataParallel: 2 CPU ranks (gloo) launched with torchrun.

The test launches this file under ``torchrun --nproc_per_node 2``; each rank trains a tiny Mamba with
a cut and writes what it ended with (a hash of its parameters, its losses, the kept states, the
all-reduced Gramian statistics) to a folder.  Three runs share one launch (the start-up dominates):

- ``broken``: the callback without its DDP handling (no all-reduce, no broadcast, no reducer
  rebuild): what happens first after the cut is that DDP's reducer, built for the old parameters,
  all-reduces those (now unused) and never the new ones — with the Trainer's default
  ``find_unused_parameters=True`` the ranks silently train different models.
- ``ddp``: the callback as shipped, ``find_unused_parameters`` at the Trainer's default (True).
- ``ddp_static``: the same with ``find_unused_parameters=False`` (without the fix: "Expected to have
  finished reduction in the prior iteration" at the first forward after the cut).
- ``ddp_fault``: surgery raises on rank 1 only at the first of two attempts: every rank must give
  up that attempt (rank 0 undoing its own cut), and both cut at the second.

Every rank must end with identical parameters, and the loss curve must match a single-process run
with the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ (helpers) when run as a script

MAX_STEPS = 8
GLOBAL_BATCH = 4
RUNS = ("broken", "ddp", "ddp_static", "ddp_fault")


def _config(**changes):
    import compressm_mamba as cm

    base = dict(mode="rank", rank=4, warmup_fraction=0.5, attempts=1, calibration_batches=2)
    base.update(changes)
    return cm.CompressConfig(**base)


def _dataset():
    pytest.importorskip("datasets", reason="the Trainer runs build their data with datasets")
    from datasets import Dataset
    from helpers import random_ids

    ids = random_ids(64, 12, vocab=64, seed=0)
    ids[:, 3:] = ids[:, :-3]
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def param_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def train_once(out_dir: str, run: str, world: int, keep: str = "largest") -> dict:
    """One Trainer run with a cut at step 4 of 8; returns (and, per rank, writes) what it ended with."""
    from helpers import tiny_mamba
    from safetensors.torch import save_file
    from transformers import Trainer, TrainingArguments

    import compressm_mamba as cm
    from compressm_mamba.training import distributed
    from compressm_mamba.cut.collect import GramianCollector
    from compressm_mamba.models.registry import find_mixers

    if run == "ddp_fault":
        callback = cm.CompreSSMCallback(_config(keep=keep, attempts=2))  # attempts at steps 2 and 4
    else:
        callback = cm.CompreSSMCallback(_config(keep=keep))
    reduced = {}
    original_all_reduce = GramianCollector.all_reduce

    def recording_all_reduce(self):
        local = {name: s.count for name, s in self.stats.items()}
        result = original_all_reduce(self)
        tensors, metadata = self.state_tensors()
        reduced.update(local=local, tensors=tensors, counts={n: s.count for n, s in self.stats.items()})
        return result

    GramianCollector.all_reduce = recording_all_reduce
    saved = {}
    from compressm_mamba.training import callback as callback_module

    real_plans_for = callback_module.plans_for
    if run == "ddp_fault":
        calls = {"n": 0}

        def plans_for(adapters, decisions):  # the first attempt's surgery fails on rank 1 only
            calls["n"] += 1
            if calls["n"] == 1 and distributed.rank() == 1:
                raise RuntimeError("injected failure on rank 1")
            return real_plans_for(adapters, decisions)

        callback_module.plans_for = plans_for
    if run == "broken":  # the callback without its DDP handling
        saved = {name: getattr(distributed, name) for name in ("all_reduce_statistics", "broadcast_decisions_",
                                                                  "rebuild_ddp_")}
        distributed.all_reduce_statistics = lambda stats, adapters, estimator: dict(stats)
        distributed.broadcast_decisions_ = lambda decisions: decisions
        distributed.rebuild_ddp_ = lambda ddp: None
    try:
        model = tiny_mamba(state_size=8, hidden=16)
        kwargs = {}
        if world > 1:
            kwargs = dict(ddp_backend="gloo", ddp_find_unused_parameters=False if run == "ddp_static" else None)
        args = TrainingArguments(
            output_dir=os.path.join(out_dir, f"trainer-{run}-{world}"), max_steps=MAX_STEPS,
            per_device_train_batch_size=GLOBAL_BATCH // world, learning_rate=3e-3, lr_scheduler_type="linear",
            logging_steps=1, report_to=[], save_strategy="steps", save_steps=3, use_cpu=True, disable_tqdm=True,
            seed=0, data_seed=0, **kwargs,
        )
        trainer = Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[callback])
        trainer.train()
    finally:
        callback_module.plans_for = real_plans_for
        GramianCollector.all_reduce = original_all_reduce
        for name, fn in saved.items():
            setattr(distributed, name, fn)
    rank = distributed.rank()  # the process group exists once TrainingArguments are built
    assert distributed.world_size() == world
    result = {
        "run": run,
        "rank": rank,
        "world": world,
        "hash": param_hash(model),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "sizes": [a.state_size for a in find_mixers(model)],
        "kept": [[d.kept.tolist() for d in r.layers] for r in callback.reports],
        "cut_steps": [r.step for r in callback.reports],
        "failures": callback.failures,
        "local_counts": reduced.get("local"),
        "reduced_counts": reduced.get("counts"),
        "checkpoint_state": os.path.isfile(os.path.join(args.output_dir, "checkpoint-3", "compressm_state.safetensors")),
    }
    prefix = os.path.join(out_dir, f"{run}-rank{rank}-of-{world}")
    with open(prefix + ".json", "w") as f:
        json.dump(result, f)
    save_file({k: v.detach().clone() for k, v in model.named_parameters()}, prefix + ".params.safetensors")
    if reduced.get("tensors"):
        save_file(reduced["tensors"], prefix + ".stats.safetensors")
    return result


def main(out_dir: str) -> None:
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    for run in RUNS:
        train_once(out_dir, run, world)
        dist.barrier()
    check_fsdp_refused(out_dir)


def check_fsdp_refused(out_dir: str) -> None:
    """FSDP1 (both parameter modes) and FSDP2 are refused by the callback, with the reason."""
    import torch.distributed as dist
    from helpers import tiny_mamba
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from transformers import TrainerControl, TrainerState

    import compressm_mamba as cm

    messages = {}
    for variant in ("fsdp1", "fsdp1_orig_params", "fsdp2"):
        model = tiny_mamba(state_size=8, hidden=16)
        if variant == "fsdp2":
            for layer in model.backbone.layers:
                fully_shard(layer)
            fully_shard(model)
        else:
            model = FullyShardedDataParallel(model, device_id=torch.device("cpu"),
                                             use_orig_params=variant == "fsdp1_orig_params")
        callback = cm.CompreSSMCallback(_config())
        try:
            callback.on_train_begin(None, TrainerState(max_steps=8), TrainerControl(), model=model)
            messages[variant] = None
        except NotImplementedError as err:
            messages[variant] = str(err)
    with open(os.path.join(out_dir, f"fsdp-rank{dist.get_rank()}.json"), "w") as f:
        json.dump(messages, f)


# ---- tests ---------------------------------------------------------------------------------------

def _load(path):
    from safetensors.torch import load_file

    return load_file(path)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), str(out)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun timed out after {err.timeout}s:\n{(err.stderr or '')[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = {}
    for run in RUNS:
        results[run] = [json.load(open(out / f"{run}-rank{r}-of-2.json")) for r in (0, 1)]
    return out, results


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("single")
    return out, train_once(str(out), "ddp", world=1)


def test_without_the_fix_ranks_silently_diverge(ddp_results):
    _, results = ddp_results
    r0, r1 = results["broken"]
    assert r0["cut_steps"] == [4] and r1["cut_steps"] == [4]
    assert r0["hash"] != r1["hash"], "ranks agreed although DDP's reducer still held the pre-cut parameters"


@pytest.mark.parametrize("run", ["ddp", "ddp_static"])
def test_every_rank_cuts_the_same_states_and_ends_identical(ddp_results, run):
    out, results = ddp_results
    r0, r1 = results[run]
    assert r0["failures"] == [] and r1["failures"] == []
    assert r0["cut_steps"] == r1["cut_steps"] == [4]
    assert r0["sizes"] == r1["sizes"] == [4, 4]
    assert r0["kept"] == r1["kept"]
    assert r0["hash"] == r1["hash"], "ranks ended with different parameters"
    # the Gramian sums (and token counts) were all-reduced: each rank saw half the tokens
    for name, local in r0["local_counts"].items():
        assert local + r1["local_counts"][name] == r0["reduced_counts"][name] == r1["reduced_counts"][name]
    s0, s1 = _load(out / f"{run}-rank0-of-2.stats.safetensors"), _load(out / f"{run}-rank1-of-2.stats.safetensors")
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert r0["checkpoint_state"], "on_save did not write compressm_state.safetensors into the checkpoint"


@pytest.mark.parametrize("run", ["ddp", "ddp_static"])
def test_ddp_matches_a_single_process_run_with_the_same_global_batch(ddp_results, single_process, run):
    out, results = ddp_results
    single_out, single = single_process
    r0 = results[run][0]
    assert len(r0["losses"]) == len(single["losses"]) == MAX_STEPS
    assert r0["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    assert r0["kept"] == single["kept"]
    assert r0["reduced_counts"] == single["reduced_counts"]
    reduced = _load(out / f"{run}-rank0-of-2.stats.safetensors")
    reference = _load(single_out / "ddp-rank0-of-1.stats.safetensors")
    for key, value in reference.items():  # each batch is computed in float32, summed in float64
        torch.testing.assert_close(reduced[key], value, rtol=1e-4, atol=1e-6 * float(value.abs().max()),
                                   msg=lambda m, key=key: f"{key}: {m}")
    params = _load(out / f"{run}-rank0-of-2.params.safetensors")
    ref_params = _load(single_out / "ddp-rank0-of-1.params.safetensors")
    assert params.keys() == ref_params.keys()
    for key, value in ref_params.items():
        torch.testing.assert_close(params[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_a_failure_on_one_rank_is_a_failure_on_every_rank(ddp_results):
    _, results = ddp_results
    r0, r1 = results["ddp_fault"]
    assert r1["failures"] == [{"step": 2, "stage": "cutting the layers", "error": "RuntimeError: injected failure on rank 1"}]
    assert r0["failures"] == [{"step": 2, "stage": "cutting the layers", "error": "failed on another rank"}]
    assert r0["cut_steps"] == r1["cut_steps"] == [4]
    assert r0["kept"] == r1["kept"] and r0["sizes"] == r1["sizes"] == [4, 4]
    assert r0["hash"] == r1["hash"]


def test_fsdp_is_refused_with_the_reason(ddp_results):
    out, _ = ddp_results
    for r in (0, 1):
        messages = json.load(open(out / f"fsdp-rank{r}.json"))
        assert set(messages) == {"fsdp1", "fsdp1_orig_params", "fsdp2"}
        for variant, message in messages.items():
            assert message and message.startswith("CompreSSMCallback does not support FSDP yet: FSDP shards"), variant


def test_random_keep_draws_the_same_states_whatever_the_local_gramians():
    """keep='random' draws from a generator seeded by config.seed (not the global RNG), so ranks with
    different local Gramians agree even before rank 0's choice is broadcast."""
    pytest.importorskip("transformers")
    from helpers import random_ids, tiny_mamba

    from compressm_mamba.cut.collect import GramianCollector
    from compressm_mamba.cut.compress import decide_cuts
    from compressm_mamba.models.registry import find_mixers

    model = tiny_mamba(state_size=8, hidden=16)
    adapters = find_mixers(model)
    kept = []
    for seed in (1, 2):
        collector = GramianCollector(adapters)
        with collector, torch.no_grad():
            model(random_ids(2, 12, seed=seed))
        torch.manual_seed(100 + seed)  # a different global RNG state on each "rank"
        decisions = decide_cuts(adapters, collector.gramians(), _config(keep="random", seed=7))
        kept.append([d.kept.tolist() for d in decisions])
    assert kept[0] == kept[1]
    other = decide_cuts(adapters, collector.gramians(), _config(keep="random", seed=8))
    assert [d.kept.tolist() for d in other] != kept[1]


def test_single_process_helpers_are_no_ops():
    from compressm_mamba.training import distributed

    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.broadcast_flag(True) and distributed.mean_over_ranks(2.5) == 2.5
    assert distributed.find_ddp(torch.nn.Linear(2, 2)) is None
    stats = {"x": object()}
    assert distributed.all_reduce_statistics(stats, [], "ltv") == stats
    distributed.rebuild_ddp_(None)


if __name__ == "__main__":
    main(sys.argv[1])
