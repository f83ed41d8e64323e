"""The DeiT-S and ResNet-50 A3 presets end to end through ``train.py`` on a small generated JPEG
folder (imagefolder layout): the real timm models, each preset's own optimizer (AdamW / LAMB) and
timm augmentation (RandAugment, erasing, mixup/cutmix) through DataLoader workers, density 0.1 with
Sup-tickets, at 32 px and a few steps. ~1-2 min each on 2 busy cores (-m slow); the run times go
to docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:

    from sparse_sup.data import load_split_datasets

    root = tmp_path_factory.mktemp("jpegs")
    splits = load_split_datasets("bundled")
    for split, ds, count in (("train", splits.train, 64), ("test", splits.eval, 32)):
        for i in range(count):
            row = ds[i]
            folder = root / split / splits.class_names[row["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            row["image"].convert("RGB").resize((48, 48)).save(folder / f"{i:04d}.jpg", quality=90)
    return root


PRESETS = {
    "deit-small-imagenet-rigl": ["--model.kwargs={drop_path_rate: 0.1, img_size: 32}"],
    "resnet50-a3-imagenet-rigl": [],
}


@pytest.mark.slow  # ~1-2 min each
@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_runs_end_to_end_on_generated_jpegs(preset, jpeg_folder, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        f"--config=configs/{preset}.yaml",
        f"--experiment.output_dir={run_dir}",
        f"--data.source={jpeg_folder}",
        "--data.eval_split=test",
        "--data.image_size=32",
        "--data.num_workers=2",
        "--data.eval_batch_size=16",
        "--schedule.epochs=8",
        "--schedule.batch_size=16",
        "--schedule.warmup_epochs=1",
        "--sparse.update_interval=4",
        "--tickets.cycle_epochs=0.5",
        "--tickets.bn_recal_batches=1",
        "--train.log_every=4",
        "--train.progress_bar=false",
        "--train.report_to=none",
        *PRESETS[preset],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    results = summary["results"]
    assert {"P", "T_1", "S_1", "T_4", "S_4", "final"} <= set(results), results
    assert all(abs(r["density"] - 0.1) < 2e-3 for r in results.values()), results
    assert all(r["count"] == 32 for r in results.values())
    config = (run_dir / "config.yaml").read_text()
    assert "auto_augment: rand-m" in config and "cutmix: 1.0" in config
    print(f"\n{preset}: {seconds:.0f} s end to end, {results['final']['step']} steps")
