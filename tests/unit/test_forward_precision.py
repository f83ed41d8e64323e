"""Evaluation and BN recalibration compute at the run's precision, as its training step does: P,
the tickets and S_M are measured with the numerics they were trained with, and a merge (which has
no Accelerate wrap to lend it an autocast) recalibrates and evaluates exactly as the run did."""

from __future__ import annotations

import pytest
import torch

from sparse_sup.backends import build_backend
from sparse_sup.config import load_config
from sparse_sup.train.model_ops import evaluate_model, recalibrate_model_bn
from sparse_sup.train.setup import prepare


@pytest.mark.parametrize(
    "precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_evaluation_and_recalibration_run_at_the_training_precision(tmp_path, precision, dtype):
    overrides = [
        f"--train.precision={precision}",
        f"--experiment.output_dir={tmp_path}",
        "--data.max_eval_samples=32",
        "--data.eval_batch_size=16",
        "--tickets.bn_recal_batches=1",
    ]
    prepared = prepare(load_config("configs/tiny-test.yaml", overrides))
    backend = build_backend(prepared.model, None, prepared.target_names)  # a plain module, as merge's
    seen: list[torch.dtype] = []
    for module in prepared.model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    evaluate_model(backend, prepared)
    assert set(seen) == {dtype}
    seen.clear()
    recalibrate_model_bn(backend, prepared, counter=0)
    assert set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in prepared.model.parameters())  # autocast, not a cast
