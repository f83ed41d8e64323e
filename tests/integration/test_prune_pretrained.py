"""The ``prune-pretrained`` preset end to end through ``train.py``: a timm model whose weights the
test saves itself (``model.checkpoint``), a dense start, GraNet's gradual global pruning to the
target during phase 1, then Sup-tickets cycles; the timm data pipeline (RandAugment, erasing,
mixup/cutmix) at a small size. ~20 s on 2 busy cores (-m slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparse_sup.models import build_model, select_targets

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~20 s on 2 busy cores
def test_prune_pretrained_preset_dense_start_gradual_prune_then_tickets(tmp_path):
    torch.manual_seed(3)
    source = build_model("test_resnet", 10)
    weights = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    run_dir = tmp_path / "run"
    args = [
        "--config=configs/prune-pretrained.yaml",
        f"--experiment.output_dir={run_dir}",
        "--model.name=test_resnet",
        "--model.pretrained=false",
        f"--model.checkpoint={weights}",
        "--data.image_size=32",
        "--data.num_workers=0",
        "--data.max_train_samples=128",
        "--data.max_eval_samples=64",
        "--data.eval_batch_size=32",
        "--schedule.epochs=5",
        "--schedule.batch_size=16",
        "--schedule.warmup_epochs=0",
        "--sparse.update_interval=4",
        "--sparse.granet_prune_end_epoch=2",
        "--tickets.bn_recal_batches=1",
        "--train.log_every=8",
        "--train.progress_bar=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    init = next(r for r in records if r.get("event") == "masks" and r.get("label") == "init")
    assert init["density"] == 1.0  # dense start: the loaded model as it is
    densities = [r["density"] for r in records if r.get("event") == "prune"]
    assert densities == sorted(densities, reverse=True)  # gradual: never denser again
    assert len({round(d, 4) for d in densities}) >= 3 and 0.1 < densities[0] < 1.0  # several steps
    assert min(densities) == pytest.approx(0.1, abs=1e-4)
    summary = json.loads((run_dir / "summary.json").read_text())
    results = summary["results"]
    assert {"P", "T_1", "S_1", "T_3", "S_3", "final"} <= set(results)
    for label in ("P", "T_1", "S_3"):
        assert abs(results[label]["density"] - 0.1) < 1e-3, results[label]
    # the final export is exactly at the target density, and it started from the saved weights:
    # every weight a mask kept dense (BatchNorm, biases) moved away from them by training only
    state = dict(source.state_dict())
    from safetensors.torch import load_file

    final = load_file(str(run_dir / "final" / "model.safetensors"))
    names = select_targets(source)
    total = sum(state[n].numel() for n in names)
    assert sum(int((final[n] != 0).sum()) for n in names) <= math.floor(0.1 * total)
    assert (run_dir / "config.yaml").read_text().count(str(weights)) == 1
