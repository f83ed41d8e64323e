"""The real optimizer step of torch-optimizer backends (one process, DDP, FSDP2) with a loss scaler,
as a GPU takes it under ``train.precision=fp16``: ``torch.amp.GradScaler("cpu")`` and fp16 autocast
drive the same code on CPU. The scaler alone decides on overflow: that step is skipped, lowers the
scale and advances no schedule; clipping after the one explicit unscale must not unscale again."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toy_models import SmallCNN

from sparse_sup.backends import StepOptions, build_backend
from sparse_sup.config import load_config, resolve_plan
from sparse_sup.engine import SupTicketsEngine

pytestmark = pytest.mark.usefixtures("one_thread")
OVERFLOW_AT = (3, 7)  # micro-batches whose loss is made infinite


def assert_masked_zero(engine: SupTicketsEngine) -> None:
    for t in engine.targets:
        dead = ~engine.masks.masks[t.name]
        for tensor in (t.param, *t.optimizer_states()):
            assert bool((tensor[dead] == 0).all()), t.name


def accelerate_prepared(optimizer: torch.optim.Optimizer, scaler) -> torch.optim.Optimizer:
    """``accelerator.prepare(optimizer)`` with Accelerate's fp16 GradScaler (built on GPUs only)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = scaler
    return accelerator.prepare(optimizer)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # as Accelerate's own tests do


@pytest.mark.parametrize("accelerate", [False, True], ids=["torch_optimizer", "accelerate_wrapped"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_fp16_scaler_step_skips_overflow_and_keeps_masks(max_grad_norm, accelerate):
    """``accelerate_wrapped``: the CLI's optimizer on a GPU in fp16, Accelerate's wrapper holding the
    same GradScaler (its ``step`` runs the scaler again): the scaler must still run once per step."""
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=4)
    if accelerate:
        optimizer = accelerate_prepared(optimizer, scaler)
    options = StepOptions(
        max_grad_norm=max_grad_norm,
        skip_nonfinite=True,
        backward=lambda loss: scaler.scale(loss).backward(),
        scaler=scaler,
    )
    backend = build_backend(model, optimizer, SmallCNN.TARGETS, options)
    config = load_config(
        None, ["--sparse.update_interval=2", "--schedule.epochs=1", "--tickets.num_cycles=0"]
    )
    engine = SupTicketsEngine.from_config(config, resolve_plan(config, 12 * 16), backend)
    engine.init_masks()
    gen = torch.Generator().manual_seed(1)
    for i in range(10):
        x, y = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        with backend.gradient_sync(True):
            with torch.autocast("cpu", dtype=torch.float16):
                logits = backend.model(x)
            loss = F.cross_entropy(logits.float(), y)
            if i in OVERFLOW_AT:
                loss = loss * float("inf")
            backend.backward(loss, 1)
        step, scale = engine.step, scaler.get_scale()
        applied = backend.optimizer_step()  # no "unscale_() has already been called" error
        if i in OVERFLOW_AT:
            assert not applied and engine.step == step, i  # advances nothing
            assert scaler.get_scale() < scale, i  # and lowers the scale
        else:
            assert applied and engine.step == step + 1, i
        assert all(p.grad is None for p in model.parameters())
        assert_masked_zero(engine)
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert engine.step == 10 - len(OVERFLOW_AT)
    assert engine.masks.total_active() == round(0.1 * sum(t.numel for t in engine.targets))
