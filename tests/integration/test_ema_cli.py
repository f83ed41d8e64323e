"""train.ema through the CLI loop: the EMA is evaluated beside P, each ticket and the final model,
masks checked every step (sparse.check_invariants), and a run stopped at step 40 and resumed
(--resume auto) reports the same EMA results, to the last digit, as the uninterrupted run.
~45 s on 2 busy cores (-m slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--config=configs/tiny-test.yaml", "--train.ema=true", "--train.ema_decay=0.9"]
ARGS += ["--checkpoint.every_steps=20", "--train.progress_bar=false"]


def train(*extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "train.py", *ARGS, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # ~45 s
def test_ema_beside_the_live_model_and_resumed_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(f"--experiment.output_dir={full}", "--sparse.check_invariants=true")
    train(f"--experiment.output_dir={resumed}", "--train.max_steps=40")
    train(f"--experiment.output_dir={resumed}", "--resume=auto")
    a = json.loads((full / "summary.json").read_text())["results"]
    b = json.loads((resumed / "summary.json").read_text())["results"]
    emas = {"P_ema", "T_1_ema", "T_2_ema", "final_ema"}
    assert emas <= set(a) and not {"S_1_ema", "S_2_ema"} & set(a)
    assert all(abs(a[k]["density"] - 0.1) < 1e-3 for k in emas)
    assert any(a[k]["accuracy"] != a[k.removesuffix("_ema")]["accuracy"] for k in emas)  # its own model
    assert {k: a[k] for k in emas} == {k: b[k] for k in emas}
