"""DeepSpeed's step keeps each parameter group's LR ratio to group 0 (torchrun, 1 process):
writes the LRs DeepSpeed's inner optimizer stepped with, one list per step, to ``argv[1]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from toy_models import SmallCNN  # noqa: E402

from sparse_sup.backends import build_backend  # noqa: E402
from sparse_sup.config import load_config, resolve_plan  # noqa: E402
from sparse_sup.engine import SupTicketsEngine  # noqa: E402


def main(out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = SmallCNN()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(
        [{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.025}], lr=0.1
    )
    config = {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 16,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
    }
    ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    backend = build_backend(ds_engine, None, SmallCNN.TARGETS)
    overrides = ["--schedule.epochs=1", "--schedule.batch_size=16", "--sparse.update_interval=2"]
    overrides += ["--tickets.num_cycles=2", "--tickets.cycles_fraction=0.5", "--tickets.lr_high=0.05"]
    cfg = load_config(None, overrides)
    engine = SupTicketsEngine.from_config(cfg, resolve_plan(cfg, 8 * 16), backend)
    engine.init_masks()
    seen = []
    inner = ds_engine.optimizer.optimizer
    inner.register_step_post_hook(
        lambda opt, *_: seen.append([engine.lr()] + [g["lr"] for g in opt.param_groups])
    )
    while engine.step < engine.plan.total_steps:
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
        backend.backward(F.cross_entropy(ds_engine(x), y), 1)
        assert backend.optimizer_step()
    Path(out).write_text(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1])
