"""``SupTicketsTrainer`` with the real ``transformers.Trainer`` on CPU: one process, DDP (torchrun,
gloo), DeepSpeed ZeRO-2/3 through the Trainer's ``deepspeed=`` option, resume from a Trainer
checkpoint, HF ResNet (BN recalibration), HF ViT and a timm model. Every run checks, after every
optimizer step, that masked weights and optimizer state are exactly zero and per-layer counts exact
(``hf_trainer_worker.CheckMasks``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import hf_trainer_worker as worker  # noqa: E402

from sparse_sup.checkpoint import load_sharded, read_manifest  # noqa: E402
from sparse_sup.core import schedules  # noqa: E402

LABELS = ["P", "T_1", "S_1", "T_2", "S_2", "final"]


def torchrun(nproc: int, timeout: int = 900, **overrides) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(HERE / "hf_trainer_worker.py"),
        json.dumps(overrides),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(overrides["out"], weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """In-process single-process runs, cached by their overrides."""
    cache: dict = {}

    def get(**overrides) -> dict:
        key = json.dumps(overrides, sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp("run")
            cache[key] = worker.run(output_dir=str(out), **overrides) | {"dir": out}
        return cache[key]

    yield get
    torch.set_default_dtype(torch.float32)


def cli_initial_masks(model_kind: str, dtype: torch.dtype, density: float = 0.2, seed: int = 0) -> dict:
    """The CLI's masks for the same model and seed: SupTicketsEngine + LocalBackend, as train/loop does."""
    from sparse_sup.backends import LocalBackend
    from sparse_sup.config import Config, ExperimentConfig, SparseConfig
    from sparse_sup.engine import SupTicketsEngine
    from sparse_sup.integrations.arguments import SparsityArguments
    from sparse_sup.models import select_targets

    model = worker.build_model(model_kind, seed, dtype)
    config = Config(
        experiment=ExperimentConfig(seed=seed), sparse=SparseConfig(method="rigl", density=density)
    )
    plan = SparsityArguments(tickets_num_cycles=2, tickets_cycle_steps=3).plan(24, 12)
    engine = SupTicketsEngine.from_config(config, plan, LocalBackend(model, None, select_targets(model)))
    engine.init_masks()
    return {k: v.clone() for k, v in engine.masks.masks.items()}


def assert_masks_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].bool().reshape(-1), b[k].bool().reshape(-1)), k


def check_run(r: dict, total: int = 24, pre: int = 18, density: float = 0.2) -> None:
    """Invariants every run must show (on top of the per-step checks inside the worker)."""
    assert r["plan"] == {"pre_steps": pre, "total_steps": total}
    assert [s["step"] for s in r["steps"]] == list(range(1, total + 1))  # one check per optimizer step
    # per-layer counts never changed before the end; the final model keeps exactly floor(d * N)
    n = sum(v.numel() for v in r["final_masks"].values())
    assert r["steps"][-1]["active"] == math.floor(density * n)
    assert sum(int(m.sum()) for m in r["final_masks"].values()) == math.floor(density * n)
    for name, mask in r["final_masks"].items():
        assert (r["final_state"][name].reshape(-1)[~mask.reshape(-1)] == 0).all(), name
    s = r["summary"]
    assert list(s["results"]) == LABELS and s["final_is"] == "S_2" and s["steps_completed"] == total
    assert s["results"]["final"]["density"] == pytest.approx(math.floor(density * n) / n)
    assert r["eval"]["eval_loss"] == pytest.approx(s["results"]["S_2"]["loss"])  # evaluate() reports S_M
    assert r["table"].splitlines()[-1].startswith("| final = S_2 |")


def saved_model_state(path: Path) -> dict:
    """What ``save_model()`` wrote, loaded back as a user would (here, outside any DeepSpeed job:
    inside one, ``from_pretrained`` would start a collective ZeRO-3 init on one rank)."""
    if (path / "config.json").exists():
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(str(path)).state_dict()
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def load_snapshot(path: Path) -> dict:
    """A sharded ticket / S_i checkpoint as whole tensors: model, masks of the targets, metadata."""
    manifest = read_manifest(path)
    shapes = {name: info["shape"] for name, info in manifest["tensors"].items()}
    loaded = load_sharded(path)
    return {
        "model": {n: v.view(shapes[n]) for n, (v, _) in loaded.items()},
        "masks": {n: m.view(shapes[n]) for n, (_, m) in loaded.items() if m is not None},
        "meta": manifest["meta"],
    }


def check_tickets(r: dict, ends: tuple[int, int] = (21, 24)) -> None:
    """Tickets and superposed models at cycle ends; the final model and save_model() are S_M."""
    tickets = r["dir"] / "tickets"
    steps = {"P": 2 * ends[0] - ends[1], "T_1": ends[0], "S_1": ends[0], "T_2": ends[1], "S_2": ends[1]}
    for name, step in steps.items():
        snap = load_snapshot(tickets / name)
        assert snap["meta"]["step"] == step, name
    s_m = load_snapshot(tickets / "S_2")
    assert_masks_equal(s_m["masks"], r["final_masks"])
    saved = saved_model_state(r["dir"] / "final")
    assert set(r["final_state"]) <= set(saved)  # save_model() wrote the whole model
    for name, value in r["final_state"].items():
        assert torch.equal(s_m["model"][name], value), name
        assert torch.equal(saved[name].to(value.dtype), value), name


# ---- one process ----------------------------------------------------------------------------------


def test_vit_one_process_with_accumulation(runs):
    """ViT, 2 micro-batches per step: invariants, tickets, S_M, CLI-identical initial masks, and the
    LR the Trainer logs: its linear scheduler over phase 1, then the cycle triangle."""
    r = runs(model="vit", optim="adamw_torch")
    check_run(r)
    check_tickets(r)
    assert_masks_equal(r["initial_masks"], cli_initial_masks("vit", torch.float32))
    logged = [e["learning_rate"] for e in r["log_history"] if "learning_rate" in e]
    assert len(logged) == 24
    for step, lr in enumerate(logged):  # the LR this optimizer step used
        if step < 18:
            expected = 0.05 * (1 - step / 18)  # lr_scheduler_type="linear" over phase 1, no warm-up
        else:
            within = (step - 18) % 3
            expected = schedules.triangle_lr(within, cycle_steps=3, lr_low=1e-3, lr_high=5e-3)
        assert lr == pytest.approx(expected, rel=1e-6), step
    assert [s["lr"] for s in r["steps"]] == pytest.approx(logged, rel=1e-6)
    # masks moved at the updates (after steps 4, 8, ...) and the re-exploration at the cycle start
    # (after step 18), and stayed frozen inside the cycle
    digests = [s["digests"] for s in r["steps"]]  # digests[i]: after optimizer step i + 1
    assert digests[3] != digests[2] and digests[17] != digests[16] and digests[18] == digests[17]


def test_hf_resnet_bn_recalibration_and_resume_mid_cycle(runs, tmp_path):
    """HF ResNet (BatchNorm, SGD): S_i gets pooled BN statistics; a run stopped mid-cycle at step 20
    and resumed from its Trainer checkpoint ends with the same masks, tickets and S_M."""
    full = runs(model="resnet", save_steps=20)
    check_run(full)
    check_tickets(full)
    assert_masks_equal(full["initial_masks"], cli_initial_masks("resnet", torch.float32))
    s_m = load_snapshot(full["dir"] / "tickets" / "S_2")["model"]
    t_2 = load_snapshot(full["dir"] / "tickets" / "T_2")["model"]
    bn = [k for k in s_m if k.endswith("num_batches_tracked")]
    assert bn and all(int(s_m[k]) == 192 // 32 for k in bn)  # recalibrated: one pass, 6 batches of 32
    assert all(int(t_2[k]) == 24 * 2 for k in bn)  # T_2: the training forwards (2 micro-batches a step)
    assert (full["dir"] / "checkpoint-20" / "sparse_sup" / "rank00000.pt").exists()

    stopped = worker.run(model="resnet", save_steps=20, stop_at=20, output_dir=str(tmp_path))
    assert stopped["summary"]["steps_completed"] == 20 and stopped["summary"]["final_is"].startswith(
        "training model at step 20"
    )
    for name in ("T_2", "S_2"):
        shutil.rmtree(tmp_path / "tickets" / name, ignore_errors=True)  # nothing of the later cycle exists
    resumed = worker.run(
        model="resnet", save_steps=20, resume=str(tmp_path / "checkpoint-20"), output_dir=str(tmp_path)
    )
    resumed["dir"] = tmp_path
    assert [s["digests"] for s in resumed["steps"]] == [s["digests"] for s in full["steps"][20:]]
    assert_masks_equal(resumed["final_masks"], full["final_masks"])
    for name, value in full["final_state"].items():
        torch.testing.assert_close(resumed["final_state"][name], value, rtol=0, atol=1e-6, msg=name)
    for name in ("T_2", "S_2"):
        a, b = load_snapshot(tmp_path / "tickets" / name), load_snapshot(full["dir"] / "tickets" / name)
        assert_masks_equal(a["masks"], b["masks"])
        for k in b["model"]:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)
    assert resumed["summary"]["results"].keys() == full["summary"]["results"].keys()  # P, T_1 restored
    assert resumed["summary"]["results"]["final"]["accuracy"] == pytest.approx(
        full["summary"]["results"]["final"]["accuracy"]
    )


def test_vit_resume_restores_weights_saved_under_legacy_names(runs, tmp_path):
    """transformers 5 saves a ViT checkpoint under its legacy key names (``vit.encoder.layer.*``) and
    the Trainer reloads it with ``load_state_dict(strict=False)``: the encoder was silently left at
    the stopped run's *initial* weights. Resumed at step 16, the run must end as the uninterrupted one
    (the re-exploration at the cycle start reads gradients, so stale weights change the masks)."""
    full = runs(model="vit", optim="adamw_torch")
    worker.run(model="vit", save_steps=16, stop_at=16, output_dir=str(tmp_path))
    resumed = worker.run(
        model="vit", save_steps=16, resume=str(tmp_path / "checkpoint-16"), output_dir=str(tmp_path)
    )
    assert [s["digests"] for s in resumed["steps"]] == [s["digests"] for s in full["steps"][16:]]
    for name, value in full["final_state"].items():
        torch.testing.assert_close(resumed["final_state"][name], value, rtol=0, atol=1e-6, msg=name)


def test_timm_model_wrapped_to_return_a_loss(runs):
    r = runs(model="timm", accum=1, per_device_batch=16, epochs=1, cycle_steps=2)  # 12 steps: 8 + 2 x 2
    check_run(r, total=12, pre=8)
    check_tickets(r, ends=(10, 12))
    assert_masks_equal(r["initial_masks"], cli_initial_masks("timm", torch.float32))


# ---- several processes --------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(runs, tmp_path):
    """torchrun, 2 processes (DDP over gloo), 4 examples each x 2 micro-batches: the masks after
    every optimizer step equal those of one process over the same global batches (float64)."""
    out = tmp_path / "ddp.pt"
    ddp = torchrun(
        2, model="vit", dtype="float64", per_device_batch=4, output_dir=str(tmp_path), out=str(out)
    )
    ddp["dir"] = tmp_path
    assert ddp["world_size"] == 2 and ddp["kind"] == "ddp"
    check_run(ddp)
    check_tickets(ddp)
    one = runs(model="vit", dtype="float64")
    assert [s["digests"] for s in ddp["steps"]] == [s["digests"] for s in one["steps"]]
    assert_masks_equal(ddp["initial_masks"], cli_initial_masks("vit", torch.float64))
    for name, value in one["final_state"].items():
        torch.testing.assert_close(ddp["final_state"][name], value, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_at_one(runs, tmp_path):
    """A Trainer checkpoint written by 2 processes (torchrun, DDP over gloo, float64), stopped mid-cycle
    at step 20 (after P, inside cycle 1: the superposition chain holds S_0), resumes at 1 process with
    the same global batch (8 x 2 micro-batches) and ends as the uninterrupted one-process run: the same
    masks after every later step, the same tickets and S_M. Masks are compared exactly; weights to
    rtol 1e-9 / atol 1e-10 (float64: DDP's all-reduce sums in another order than one process)."""
    out = tmp_path / "ddp.pt"
    common = dict(model="vit", dtype="float64", save_steps=20)
    torchrun(2, **common, per_device_batch=4, stop_at=20, output_dir=str(tmp_path), out=str(out))
    for name in ("T_2", "S_2"):
        shutil.rmtree(tmp_path / "tickets" / name, ignore_errors=True)
    resumed = worker.run(**common, resume=str(tmp_path / "checkpoint-20"), output_dir=str(tmp_path))
    assert resumed["world_size"] == 1
    assert (tmp_path / "checkpoint-20" / "sparse_sup" / "rank00001.pt").exists()  # rank 1's rest
    one = runs(model="vit", dtype="float64")
    assert [s["digests"] for s in resumed["steps"]] == [s["digests"] for s in one["steps"][20:]]
    assert_masks_equal(resumed["final_masks"], one["final_masks"])
    for name, value in one["final_state"].items():
        torch.testing.assert_close(resumed["final_state"][name], value, rtol=1e-9, atol=1e-10, msg=name)
    for name in ("T_2", "S_2"):
        a, b = load_snapshot(tmp_path / "tickets" / name), load_snapshot(one["dir"] / "tickets" / name)
        assert_masks_equal(a["masks"], b["masks"])
        for k in b["model"]:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-9, atol=1e-10, msg=k)
    s = resumed["summary"]
    assert list(s["results"]) == LABELS and s["final_is"] == "S_2"  # P and T_1 restored from the checkpoint
    assert s["results"]["final"]["loss"] == pytest.approx(
        one["summary"]["results"]["final"]["loss"], rel=1e-9
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage, optim", [(2, "sgd"), (3, "adamw_torch")])
def test_deepspeed_zero_two_processes(runs, tmp_path, stage, optim):
    """The Trainer's deepspeed= option (ZeRO-2/3, 2 processes, gloo): masks enforced on DeepSpeed's
    fp32 masters inside its step (run inside backward), the same masks after every step as one
    process over the same global batches. Weights: ZeRO-2 with SGD equals it to float32 rounding;
    ZeRO-3 rounds differently from the first step (PLATFORM.md) and Adam's normalisation amplifies
    that on tiny gradients, so there only the masks, the tickets and the losses are compared."""
    out = tmp_path / "ds.pt"
    ds = torchrun(
        2,
        model="vit",
        deepspeed=stage,
        optim=optim,
        per_device_batch=4,
        output_dir=str(tmp_path),
        out=str(out),
    )
    ds["dir"] = tmp_path
    assert ds["world_size"] == 2 and ds["kind"] == "deepspeed"
    check_run(ds)
    check_tickets(ds)
    assert_masks_equal(ds["initial_masks"], cli_initial_masks("vit", torch.float32))
    one = runs(model="vit", optim=optim)
    assert [s["digests"] for s in ds["steps"]] == [s["digests"] for s in one["steps"]]
    for label, result in one["summary"]["results"].items():
        assert ds["summary"]["results"][label]["loss"] == pytest.approx(result["loss"], abs=2e-3), label
    if stage == 2:
        for name, value in one["final_state"].items():
            torch.testing.assert_close(ds["final_state"][name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.gpu
def test_fsdp2_through_the_trainer_on_gpus(tmp_path):
    """The Trainer's fsdp= option has no CPU path: FSDP2 on 2 GPUs (launch/gpu_check.sh runs it too)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "fsdp.pt"
    r = torchrun(2, model="vit", fsdp=True, per_device_batch=4, output_dir=str(tmp_path), out=str(out))
    r["dir"] = tmp_path
    assert r["kind"] == "fsdp2"
    check_run(r)
    check_tickets(r)


# ---- arguments and layering -------------------------------------------------------------------


def test_sparsity_arguments_parse_with_training_arguments(tmp_path):
    from transformers import HfArgumentParser, TrainingArguments

    from sparse_sup import SparsityArguments

    parser = HfArgumentParser((TrainingArguments, SparsityArguments))
    _, sparsity = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--sparse_method", "set", "--sparse_density", "0.05"]
        + ["--sparse_exclude", "classifier.*", "--tickets_num_cycles", "4", "--tickets_cycle_steps", "10"]
    )
    assert (sparsity.sparse_method, sparsity.sparse_density, sparsity.sparse_exclude) == (
        "set",
        0.05,
        ["classifier.*"],
    )
    assert sparsity.plan(100, 10).pre_steps == 60
    with pytest.raises(ValueError, match=r"sparse_density=1\.5 is invalid"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--sparse_density", "1.5"])
    fit = r"do not fit in the Trainer's optimizer steps \(30 steps\).*max_steps / num_train_epochs"
    with pytest.raises(ValueError, match=fit):
        sparsity.plan(30, 10)


def test_import_sparse_sup_does_not_import_transformers():
    code = (
        "import sys, sparse_sup\nfrom sparse_sup import SparsityArguments\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "from sparse_sup import SupTicketsTrainer\nassert 'transformers' in sys.modules\n"
        "import transformers\nassert issubclass(SupTicketsTrainer, transformers.Trainer)\nprint('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---- skipped steps, LR groups, schedulers, a second train(), half-written checkpoints -------------

TIMM = dict(model="timm", accum=1, per_device_batch=16, epochs=1, cycle_steps=2)  # 12 steps: 8 + 2 x 2


@pytest.mark.parametrize("scaler", [True, False], ids=["grad_scaler_overflow", "nonfinite_no_scaler"])
def test_skipped_steps_count_for_nothing_and_the_run_still_ends_with_s_m(runs, scaler):
    """Trainer steps 3 and 12 get an infinite loss: the GradScaler skips them (overflow), or, without
    one, the step is skipped as non-finite. They advance nothing, and the Trainer trains on (here into a
    second epoch) until the plan's 12 applied steps are done: the run still ends with S_M."""
    r = runs(**TIMM, skip_at=[3, 12], scaler=scaler)
    s = r["summary"]
    assert (s["final_is"], s["steps_completed"], s["skipped_steps"]) == ("S_2", 12, 2)
    assert r["global_step"] == 14
    check_run(r, total=12, pre=8)  # each applied step checked once; masked weights and states zero
    check_tickets(r, ends=(10, 12))


def test_parameter_groups_keep_their_lr_ratio_in_phase1_and_in_the_cycles(runs):
    """Layer-wise LRs (head at lr, the rest at lr / 2): every step, phase 1 and cycles, keeps the ratio;
    group 0 follows the plan's LR."""
    r = runs(**TIMM, head_lr_groups=True)
    check_run(r, total=12, pre=8)
    for s in r["steps"]:
        head, body = s["group_lrs"]
        assert head == pytest.approx(s["lr"], rel=1e-9), s["step"]
        assert body == pytest.approx(head / 2, rel=1e-9), s["step"]


def test_tail_schedule_follows_the_users_scheduler_over_the_whole_budget(runs):
    """tickets_schedule="tail" in the Trainer, as in the CLI: the LR of every step is the base run's
    (the user's linear schedule over all 12 steps, no triangle), masks never change in the tail (no
    re-exploration), and the tickets are the models at its equal steps, each at exact density."""
    base = runs(**TIMM, cycles=0)
    tail = runs(**TIMM, schedule="tail")
    check_run(tail, total=12, pre=8)
    check_tickets(tail, ends=(10, 12))
    lrs = [s["group_lrs"][0] for s in tail["steps"]]  # what each step used
    assert lrs == [s["group_lrs"][0] for s in base["steps"]] == [s["lr"] for s in tail["steps"]]
    assert lrs[0] == pytest.approx(0.05) and all(a > b > 0 for a, b in zip(lrs, lrs[1:]))  # linear decay
    assert tail["summary"]["plan"]["ticket_schedule"] == "tail"
    in_tail = [json.dumps(s["digests"], sort_keys=True) for s in tail["steps"] if s["step"] >= 8]
    assert len(set(in_tail)) == 1  # frozen from the end of phase 1: no re-exploration in the tail


def test_tail_cycles_is_the_base_run_then_the_triangle(runs):
    """tickets_schedule="tail_cycles": the user's scheduler over all 12 steps sets phase 1's LR and
    masks (the base run's, step for step), then each cycle runs the triangle with frozen masks."""
    base = runs(**TIMM, cycles=0)
    late = runs(**TIMM, schedule="tail_cycles")
    check_run(late, total=12, pre=8)
    check_tickets(late, ends=(10, 12))
    lrs = [s["group_lrs"][0] for s in late["steps"]]
    assert lrs[:8] == [s["group_lrs"][0] for s in base["steps"]][:8]
    assert lrs[8:] == pytest.approx(
        [schedules.triangle_lr(i % 2, cycle_steps=2, lr_low=1e-3, lr_high=5e-3) for i in range(4)]
    )
    # the masks after steps 1..7 are the base run's; the base run's update after step 8 is the first
    # cycle's start here, where the masks freeze (no re-exploration by default)
    assert [s["digests"] for s in late["steps"][:7]] == [s["digests"] for s in base["steps"][:7]]
    assert base["steps"][7]["digests"] != base["steps"][6]["digests"]
    assert len({json.dumps(s["digests"], sort_keys=True) for s in late["steps"][6:]}) == 1
    assert late["summary"]["plan"]["ticket_schedule"] == "tail_cycles"


@pytest.mark.parametrize("scheduler", ["reduce_lr_on_plateau", "greedy"])
def test_metric_driven_lr_schedulers_are_refused_at_construction(tmp_path, scheduler):
    from transformers import TrainingArguments

    from sparse_sup import SupTicketsTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path), lr_scheduler_type=scheduler, eval_strategy="steps", eval_steps=4
    )
    _, eval_set = worker.datasets(torch.float32)
    with pytest.raises(ValueError, match=f"lr_scheduler_type='{scheduler}'.*'linear'"):
        SupTicketsTrainer(
            model=worker.build_model("timm", 0, torch.float32), args=args, eval_dataset=eval_set
        )


def test_a_second_train_resumes_in_place_or_is_refused(runs, tmp_path):
    """train() again on the same trainer: after a stop at step 6, resuming from its checkpoint continues
    the same run with the engine hooked once (the same masks after every step as the uninterrupted
    run); without a checkpoint it is refused (the model already holds a sparse run's weights)."""
    full = runs(**TIMM)
    trainer, checker, stop = worker.build(**TIMM, save_steps=6, stop_at=6, output_dir=str(tmp_path))
    trainer.train()
    assert trainer.sparse_engine.step == 6
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        trainer.train()
    trainer.remove_callback(stop)
    trainer.train(resume_from_checkpoint=True)
    r = worker.collect(trainer, checker, **TIMM) | {"dir": tmp_path}
    check_run(r, total=12, pre=8)
    assert [s["digests"] for s in r["steps"]] == [s["digests"] for s in full["steps"]]
    assert_masks_equal(r["final_masks"], full["final_masks"])


def test_resume_never_picks_a_half_written_checkpoint(runs, tmp_path):
    """A crash while saving leaves a checkpoint folder with one part only: checkpoint-12 without the
    Trainer's trainer_state.json (its last file), checkpoint-8 without the sparse state. Resuming with
    resume_from_checkpoint=True falls back to checkpoint-4, the last complete one, and ends as the
    uninterrupted run; naming an incomplete folder is refused before anything is loaded."""
    full = runs(**TIMM, save_steps=4)
    for step in (4, 8, 12):
        shutil.copytree(full["dir"] / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-12" / "trainer_state.json").unlink()
    shutil.rmtree(tmp_path / "checkpoint-8" / "sparse_sup")
    for step, missing in ((8, "sparse_sup"), (12, "trainer_state.json")):
        with pytest.raises(ValueError, match=f"checkpoint-{step} is incomplete.*{missing}"):
            worker.run(**TIMM, resume=str(tmp_path / f"checkpoint-{step}"), output_dir=str(tmp_path))
    resumed = worker.run(**TIMM, save_steps=4, resume=True, output_dir=str(tmp_path))
    assert [s["step"] for s in resumed["steps"]] == list(range(5, 13))
    assert [s["digests"] for s in resumed["steps"]] == [s["digests"] for s in full["steps"][4:]]
    assert_masks_equal(resumed["final_masks"], full["final_masks"])
    assert resumed["summary"]["final_is"] == "S_2"


def test_a_deepspeed_checkpoint_at_another_world_size_is_refused_before_loading(runs, tmp_path):
    """DeepSpeed's engine checkpoint holds each rank's ZeRO partition: a Trainer checkpoint written by
    a 2-process DeepSpeed job is refused at 1 process, with the CLI's reason, before anything loads."""
    from sparse_sup.checkpoint import atomic_torch_save, load_verified
    from sparse_sup.checkpoint.state_pieces import rank_file

    full = runs(**TIMM, save_steps=4)
    shutil.copytree(full["dir"] / "checkpoint-4", tmp_path / "checkpoint-4")
    rest = tmp_path / "checkpoint-4" / "sparse_sup" / rank_file(0)
    atomic_torch_save(load_verified(rest) | {"world_size": 2, "parallelism": "deepspeed"}, rest)
    with pytest.raises(ValueError, match="written by 2 processes and this job has 1: DeepSpeed's engine"):
        worker.run(**TIMM, resume=str(tmp_path / "checkpoint-4"), output_dir=str(tmp_path))
