"""DeepSpeed beyond fp32 on 2 ranks (issue 17): bf16, where DeepSpeed casts the module and the caller
the inputs, with masked gradients zeroed where the ZeRO optimizer reads them; and ZeRO-3 on 3-4 ranks
with parameters smaller than the world, so that some rank holds only padding of them.

Real DeepSpeed over gloo processes (tests/distributed/equivalence_worker.py). The fp32 ZeRO-1/2/3 runs
of test_multiprocess.py go through the same worker checks (masked gradients at the optimizer's read,
masters, module weights, optimizer state), so together both precisions are covered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import equivalence_worker  # noqa: E402
from test_multiprocess import torchrun  # noqa: E402

# Weights after EARLY_STEP (2) steps, before any topology update, against the float32 reference.
# bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3): the forward and backward in bf16 give
# gradients ~1% off, and two SGD steps (lr 0.1, momentum 0.9) move a weight by at most
# 0.1 * (1 + 1.9) * |g|; measured max |difference| 1.2e-3 on weights up to 1.0. From the first
# topology update on, RigL ranks bf16 gradients: near-ties flip (measured: 4 of 71 and 4 of 104 kept
# positions differ at step 3), so later weights and masks are not compared; the schedule, the initial
# masks (seeded), exact per-layer counts and exact zeros are.
BF16_ATOL = 5e-3


@pytest.fixture(scope="module")
def float32_reference():
    result = equivalence_worker.ToyRun("reference", "rigl", 2, torch.float32).train()
    torch.set_default_dtype(torch.float32)
    return result


@pytest.mark.parametrize(
    "stage, precision, optimizer",
    [
        (2, "bf16", "DeepSpeedZeroOptimizer"),
        (3, "bf16", "DeepSpeedZeroOptimizer_Stage3"),
        pytest.param(1, "bf16-fp32-accum", "BF16_Optimizer", marks=pytest.mark.slow),
    ],
)
def test_deepspeed_bf16_zeroes_masked_gradients_where_the_optimizer_reads(
    tmp_path, float32_reference, stage, precision, optimizer
):
    """ZeRO-3 in bf16 used to hand the engine a fp32 *copy* of the bf16 gradient partition, so the
    masking missed the optimizer (12,639 masked gradient elements nonzero at the optimizer's read over
    24 steps, and 8,426 masked module weights nonzero after the steps). ZeRO-1 with fp32 gradient
    accumulation runs DeepSpeed's BF16_Optimizer, which keeps whole gradients: its path too."""
    out = tmp_path / "result.pt"
    args = ["--mode", f"zero{stage}", "--float32", "--precision", precision, "--out", str(out)]
    torchrun(2, "equivalence_worker.py", *args)
    got = torch.load(out, weights_only=False)
    ref = float32_reference
    assert got["optimizer"] == optimizer
    assert got["input_dtype"] == torch.bfloat16  # the backend tells the loop to cast inputs
    counts = got["masked_nonzero"]  # summed over 24 steps and both ranks
    assert counts["checked_grads"] >= 24 and counts["grad"] == 0, counts  # at the inner optimizer's read
    assert counts["master"] == counts["module"] == counts["state"] == 0, counts  # after every step
    assert got["checked_steps"] == got["deepspeed_global_steps"] == got["step"] == 24
    assert [(s, k) for s, k, _ in got["events"]] == [(s, k) for s, k, _ in ref["events"]]
    for name, mask in ref["events"][0][2].items():
        assert torch.equal(got["events"][0][2][name], mask), name  # initial masks: seeded, exact
    for (step, kind, masks), (_, _, ref_masks) in zip(got["events"], ref["events"]):
        for name, mask in ref_masks.items():
            assert int(masks[name].sum()) == int(mask.sum()), (step, kind, name)  # exact per-layer counts
    for name, value in ref["early"].items():
        if "running" not in name and "num_batches" not in name:  # BN statistics: per rank's batches
            torch.testing.assert_close(got["early"][name].to(value.dtype), value, rtol=0, atol=BF16_ATOL)
    assert [s["accuracy"]["count"] for s in got["superposed"]] == [37, 37]  # bf16 BN recalibration, eval
    for name, mask in got["final_masks"].items():
        assert bool((got["final"][name][~mask] == 0).all()), name


def test_deepspeed_config_casts_buffers_with_the_training_dtype():
    """DeepSpeed 0.19 casts parameters only: BatchNorm then fails on bf16 weights beside fp32 running
    statistics (measured: test_resnet under `deepspeed` and Accelerate's plugin, bf16, both stages)."""
    from sparse_sup.backends.deepspeed_config import fill_deepspeed_config
    from sparse_sup.config import load_config

    base = {"zero_optimization": {"stage": 3}}
    bf16 = load_config(None, ["--schedule.batch_size=8", "--train.precision=bf16"])
    assert fill_deepspeed_config(dict(base), bf16, 2)["data_types"]["buffer_dtype"] == "bf16"
    kept = fill_deepspeed_config({**base, "data_types": {"buffer_dtype": "fp32"}}, bf16, 2)
    assert kept["data_types"]["buffer_dtype"] == "fp32"  # an explicit choice wins
    fp32 = load_config(None, ["--schedule.batch_size=8"])
    assert "buffer_dtype" not in fill_deepspeed_config(dict(base), fp32, 2).get("data_types", {})


def test_zero_offload_is_refused_before_training(tmp_path):
    """With ZeRO offload the fp32 masters and optimizer state live where DeepSpeed exposes only
    copies, so masks would silently miss the update: refused with exit 2, naming the key to remove,
    before anything is written (the backend refuses the same for the Trainer's deepspeed= path)."""
    from sparse_sup.backends.deepspeed_config import refuse_offload
    from sparse_sup.config import ConfigError

    refuse_offload({"offload_optimizer": None, "offload_param": "none"})  # no offload: accepted
    with pytest.raises(ConfigError, match="zero_optimization.offload_param on 'nvme'"):
        refuse_offload({"offload_optimizer": None, "offload_param": "nvme"})
    ds = tmp_path / "zero2-offload.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    args = ["--config", "configs/tiny-test.yaml", f"--experiment.output_dir={run_dir}"]
    cmd = [sys.executable, str(ROOT / "train.py"), "--deepspeed", str(ds), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "zero_optimization.offload_optimizer on 'cpu' is not supported" in proc.stderr
    assert not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed runs fp16 on GPUs")
def test_fp16_under_deepspeed_on_cpu_is_refused_before_anything_is_written(tmp_path):
    """DeepSpeed has no fp16 on CPU: its engine raised 'Type fp16 is not supported on your device' from
    deepspeed.initialize, as a traceback after the data and model were built (measured: 2.5 min on 2
    busy cores, exit 1). Now exit 2 before anything is written, saying what runs instead (the loop's own
    CPU fp16 path, autocast + GradScaler, is for one process and DDP, never around DeepSpeed's engine)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    args = [
        "--config",
        "configs/tiny-test.yaml",
        "--train.precision=fp16",
        f"--experiment.output_dir={run_dir}",
    ]
    cmd = [sys.executable, str(ROOT / "train.py"), "--deepspeed", "launch/deepspeed/zero2.json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train.precision='fp16' under DeepSpeed on CPU" in proc.stderr
    assert "train.precision=bf16" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()


def run_padded_zero3(tmp_path: Path, world: int) -> tuple[dict, Path]:
    out, ticket = tmp_path / "result.pt", tmp_path / "ticket"
    args = ["--mode", "zero3", "--model", "padded", "--float32", "--max-steps", "4"]
    torchrun(world, "equivalence_worker.py", *args, "--ticket", str(ticket), "--out", str(out))
    return torch.load(out, weights_only=False), ticket


@pytest.mark.parametrize("world", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_zero3_ticket_with_padding_only_ranks_reads_back_at_world_1(tmp_path, world):
    """PReLU's 1 element on 3 ranks (ceil(1/3) = 1: rank 2 starts at 2) and the head's 5-element bias
    on 4 (ceil(5/4) = 2: rank 3 starts at 6) leave a rank only padding; its fragment used to lie
    past the tensor's end and the ticket could not be written. Four steps include a RigL update."""
    from sparse_sup.backends import build_backend
    from sparse_sup.checkpoint.tickets import load_model_checkpoint

    got, ticket = run_padded_zero3(tmp_path, world)
    assert got["step"] == 4 and got["masked_nonzero"]["grad"] == 0
    model = equivalence_worker.PaddedToyNet()  # float32, other initial values: all are overwritten
    backend = build_backend(model, None, equivalence_worker.TARGETS)
    masks = load_model_checkpoint(ticket, backend, backend.target_names)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert set(state) == set(got["final"])
    for name, value in got["final"].items():  # the whole fp32 masters, gathered by the run itself
        assert torch.equal(state[name].detach(), value), name
    for name, mask in got["final_masks"].items():
        assert torch.equal(masks[name], mask), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, model, stage",
    [("deepspeed", "test_vit", 3), ("deepspeed", "test_resnet", 2), ("accelerate", "test_resnet", 3)],
)
def test_bf16_end_to_end(tmp_path, launcher, model, stage):
    """The CLI loop in bf16 under the `deepspeed` launcher and Accelerate's DeepSpeed plugin: inputs
    cast to the module's dtype, BatchNorm buffers cast with it (45-100 s each on 2 busy cores)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    common = ["--config", "configs/tiny-test.yaml", "--schedule.epochs=3", f"--model.name={model}"]
    common += ["--train.precision=bf16", f"--experiment.output_dir={run_dir}"]
    if launcher == "deepspeed":
        ds, deepspeed = f"launch/deepspeed/zero{stage}.json", str(Path(sys.executable).parent / "deepspeed")
        cmd = [deepspeed, "--num_gpus", "2", "train.py", "--deepspeed", ds]
    else:
        yaml = f"launch/accelerate/deepspeed_zero{stage}-cpu.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", yaml]
        cmd += ["--mixed_precision", "bf16", "train.py"]
    proc = subprocess.run(cmd + common, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["parallelism"] == "deepspeed" and summary["steps_completed"] == 24
    assert all(r["count"] == 300 for r in summary["results"].values())
    assert summary["results"]["S_2"]["density"] == pytest.approx(0.1, abs=1e-4)


def test_deepspeed_step_keeps_each_group_lr_ratio(tmp_path):
    """Every parameter group used to be set to group 0's LR inside DeepSpeed's step (layer-wise LR
    decay lost): now group i runs at its ratio of the engine's LR, in phase 1 and in the cycles."""
    out = tmp_path / "lrs.json"
    torchrun(1, "lr_groups_worker.py", str(out))
    seen = json.loads(out.read_text())
    # ZeRO-1/2 step the inner optimizer once per group, with that group alone in param_groups
    assert len(seen) == 2 * 8 and all(len(entry) == 2 for entry in seen)
    group0, group1 = seen[0::2], seen[1::2]
    for (engine_lr, lr0), (engine_lr1, lr1) in zip(group0, group1):
        assert engine_lr == engine_lr1 and lr0 == pytest.approx(engine_lr, rel=1e-12)
        assert lr1 == pytest.approx(0.25 * engine_lr, rel=1e-12)
    assert len({round(lr0, 12) for _, lr0 in group0}) > 2  # the schedule moved (phase 1, then cycles)
