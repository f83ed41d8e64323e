"""SupTicketsEngine with LocalBackend on toy models: gradient accumulation, skipped steps,
determinism, the ticket / superposition timeline and torch.compile."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from toy_models import SmallCNN

from sparse_sup.backends import LocalBackend
from sparse_sup.config import load_config, resolve_plan
from sparse_sup.engine import EngineHooks, SupTicketsEngine
from sparse_sup.tickets import recalibrate_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def make_engine(
    overrides: list[str],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    names: list[str],
    num_samples: int,
    seed: int = 0,
    hooks: EngineHooks | None = None,
    base_lr: float = 0.1,
):
    cfg = load_config(None, [*overrides, f"--experiment.seed={seed}", f"--optim.lr={base_lr}"])
    plan = resolve_plan(cfg, num_samples)
    engine = SupTicketsEngine.from_config(cfg, plan, LocalBackend(model, opt, names), hooks)
    engine.init_masks()
    return engine


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def masks_of(engine: SupTicketsEngine) -> dict[str, torch.Tensor]:
    return {n: m.clone() for n, m in engine.masks.masks.items()}


def same_masks(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


class UpdateLog(EngineHooks):
    def __init__(self) -> None:
        self.updates: list[tuple[str, int, dict[str, torch.Tensor]]] = []

    def on_topology_update(self, engine, kind, swapped) -> None:
        self.updates.append((kind, engine.step, masks_of(engine)))


MLP_NAMES = ["0.weight", "2.weight"]


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5)).to(dtype)


# RigL (gradient regrowth), 2 cycles, updates every 5 steps: 30 steps, phase 1 = 20
MLP_RUN = [
    "--sparse.method=rigl",
    "--sparse.density=0.2",
    "--sparse.update_interval=5",
    "--schedule.epochs=6",
    "--schedule.batch_size=32",
    "--tickets.num_cycles=2",
    "--tickets.cycle_epochs=1",
    "--tickets.cycles_fraction=null",
    "--tickets.mask_in_cycles=update",
    "--schedule.lr_schedule=cosine",
]
MLP_SAMPLES = 160


def mlp_data(dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(42)
    x = torch.randn(MLP_SAMPLES, 10, generator=g).to(dtype)
    return x, torch.randint(0, 5, (MLP_SAMPLES,), generator=g)


# --- (a) gradient accumulation ------------------------------------------------------------------
def test_gradient_accumulation_matches_full_batch() -> None:
    x, y = mlp_data()
    runs = []
    for _ in range(2):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        log = UpdateLog()
        runs.append((model, opt, make_engine(MLP_RUN, model, opt, MLP_NAMES, MLP_SAMPLES, hooks=log), log))
    (m_full, o_full, e_full, log_full), (m_acc, o_acc, e_acc, log_acc) = runs
    assert e_full.plan.total_steps == 30 and e_full.plan.pre_steps == 20
    loss_fn = nn.functional.cross_entropy
    for step in range(e_full.plan.total_steps):
        i = (step * 32) % MLP_SAMPLES
        xb, yb = x[i : i + 32], y[i : i + 32]
        # one batch of 32
        o_full.zero_grad()
        loss_fn(m_full(xb), yb).backward()
        set_lr(o_full, e_full.lr())
        e_full.before_optimizer_step()
        o_full.step()
        e_full.after_optimizer_step()
        # the same data as 4 micro-batches of 8, loss / 4 accumulated
        o_acc.zero_grad()
        for j in range(4):
            (loss_fn(m_acc(xb[8 * j : 8 * j + 8]), yb[8 * j : 8 * j + 8]) / 4).backward()
        set_lr(o_acc, e_acc.lr())
        e_acc.before_optimizer_step()
        o_acc.step()
        e_acc.after_optimizer_step()
        assert e_full.step == e_acc.step == step + 1
        assert e_full.lr() == e_acc.lr()
        assert e_full.phase() == e_acc.phase()
        assert same_masks(masks_of(e_full), masks_of(e_acc)), step
        for p, q in zip(m_full.parameters(), m_acc.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-10), step
    assert [(k, s) for k, s, _ in log_full.updates] == [(k, s) for k, s, _ in log_acc.updates]
    kinds = {k for k, _, _ in log_full.updates}
    assert kinds == {"update", "reexplore"}
    for (_, _, a), (_, _, b) in zip(log_full.updates, log_acc.updates, strict=True):
        assert same_masks(a, b)
    # the topology really moved
    assert not same_masks(log_full.updates[0][2], log_full.updates[-1][2])


# --- (b) a skipped step counts for nothing -----------------------------------------------------
def _train_mlp(skip_at: set[int]) -> tuple[nn.Module, SupTicketsEngine, list]:
    x, y = mlp_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    log = UpdateLog()
    engine = make_engine(MLP_RUN, model, opt, MLP_NAMES, MLP_SAMPLES, hooks=log)
    history = []
    while engine.step < engine.plan.total_steps:
        step = engine.step
        if step in skip_at:
            skip_at.discard(step)
            # an overflowing step: backward on other data, inf in a gradient, no optimizer step
            before = (
                step,
                engine.lr(),
                engine.phase(),
                masks_of(engine),
                [p.clone() for p in model.parameters()],
            )
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[:32] * 3 + 1), y[:32]).backward()
            model[0].weight.grad[0, 0] = float("inf")
            set_lr(opt, engine.lr())
            engine.before_optimizer_step()
            engine.after_optimizer_step(skipped=True)
            assert engine.step == before[0]
            assert engine.lr() == before[1] and engine.phase() == before[2]
            assert same_masks(masks_of(engine), before[3])
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[4], strict=True))
            continue
        i = (step * 32) % MLP_SAMPLES
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
        set_lr(opt, engine.lr())
        engine.before_optimizer_step()
        opt.step()
        engine.after_optimizer_step(skipped=False)
        history.append((engine.step, engine.lr(), masks_of(engine), [p.clone() for p in model.parameters()]))
    return model, engine, history


def test_skipped_step_changes_nothing() -> None:
    # 4 and 19: the next completed step (5, 20) is a gradient update / the end of phase 1;
    # 24: inside cycle 0, where the LR is a triangle
    _, e_ref, h_ref = _train_mlp(set())
    _, e_skip, h_skip = _train_mlp({0, 4, 19, 24})
    assert len(h_ref) == len(h_skip) == 30
    for (s1, lr1, m1, p1), (s2, lr2, m2, p2) in zip(h_ref, h_skip, strict=True):
        assert s1 == s2 and lr1 == lr2
        assert same_masks(m1, m2), s1
        assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True)), s1
    assert e_ref.num_tickets == e_skip.num_tickets == 2


# --- (c) determinism ---------------------------------------------------------------------------


CNN_NAMES = SmallCNN.TARGETS
CNN_SAMPLES, CNN_BATCH = 160, 16
CNN_RUN = [
    "--sparse.density=0.1",
    "--sparse.update_interval=5",
    "--schedule.epochs=6",
    f"--schedule.batch_size={CNN_BATCH}",
    "--tickets.num_cycles=2",
    "--tickets.cycle_epochs=1",
    "--tickets.cycles_fraction=null",
    "--tickets.lr_low=0.002",
    "--tickets.lr_high=0.02",
]


def cnn_data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(CNN_SAMPLES, 3, 6, 6, generator=g), torch.randint(0, 10, (CNN_SAMPLES,), generator=g)


def train_cnn(overrides: list[str], seed: int, hooks: EngineHooks | None = None, model_seed: int = 0):
    x, y = cnn_data()
    torch.manual_seed(model_seed)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if hooks is not None:
        hooks.bind(model, opt, x)
    engine = make_engine(
        CNN_RUN + overrides, model, opt, CNN_NAMES, CNN_SAMPLES, seed=seed, hooks=hooks, base_lr=0.05
    )
    for step in range(engine.plan.total_steps):
        i = (step * CNN_BATCH) % CNN_SAMPLES
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + CNN_BATCH]), y[i : i + CNN_BATCH]).backward()
        set_lr(opt, engine.lr())
        engine.before_optimizer_step()
        opt.step()
        engine.after_optimizer_step()
        if hooks is not None:
            hooks.after_step(engine)
    return model, engine


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_same_seed_same_masks_after_full_run(method: str) -> None:
    m1, e1 = train_cnn([f"--sparse.method={method}"], seed=3)
    m2, e2 = train_cnn([f"--sparse.method={method}"], seed=3)
    m3, e3 = train_cnn([f"--sparse.method={method}"], seed=4)
    assert e1.num_tickets == 2 and e1.step == e1.plan.total_steps == 60
    assert same_masks(masks_of(e1), masks_of(e2))
    assert e1.masks.checksum(e1.targets) == e2.masks.checksum(e2.targets)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not same_masks(masks_of(e1), masks_of(e3))


# --- (d) the ticket / superposition timeline ---------------------------------------------------
class Timeline(EngineHooks):
    def bind(self, model, opt, data) -> None:
        self.model, self.opt, self.data = model, opt, data
        self.events: list[tuple] = []
        self.snap_p: dict[str, torch.Tensor] | None = None
        self.snap_t: list[dict[str, torch.Tensor]] = []
        self.pending_check: tuple[int, dict[str, torch.Tensor]] | None = None

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def on_phase1_end(self, engine) -> None:
        self.events.append(("P", engine.step))
        self.snap_p = self._state()

    def on_ticket(self, engine, index) -> None:
        lr_used = self.opt.param_groups[0]["lr"]  # set before the step that ended the cycle
        self.events.append(("T", engine.step, index, engine.lr(engine.step - 1), lr_used))
        self.snap_t.append(self._state())
        for n in CNN_NAMES:  # a ticket obeys its masks
            assert bool((self.model.get_parameter(n)[~engine.masks.masks[n]] == 0).all())

    def recalibrate_bn(self, engine) -> None:
        self.events.append(("BN", engine.step))
        assert recalibrate_batchnorm(self.model, self.data.split(40)) == 2

    def on_superposed(self, engine, index) -> None:
        self.events.append(("S", engine.step, index))
        # the model holds S_{index+1}: exactly floor(d N) target weights in S's masks
        chain_masks = engine.chain.masks
        assert sum(int(m.sum()) for m in chain_masks.values()) == engine.final_keep
        for n in CNN_NAMES:
            assert bool((self.model.get_parameter(n)[~chain_masks[n]] == 0).all())
        # its BN statistics were just recalibrated on S
        bn = self.model.bn1
        assert int(bn.num_batches_tracked) == 4
        self.pending_check = (engine.step, self.snap_t[-1])

    def after_step(self, engine) -> None:
        # after the swap back the model holds the ticket again (nothing else happens at that step
        # when re-exploration is off), except after the last one where S is installed
        if self.pending_check is not None and engine.step < engine.plan.total_steps:
            step, snap = self.pending_check
            assert step == engine.step
            state = self.model.state_dict()
            assert all(torch.equal(state[k], snap[k]) for k in snap)
        self.pending_check = None


def _hand_superposition(p, tickets, names, keep):
    """S_0 = P, S_i = prune(i/(i+1) S_{i-1} + 1/(i+1) T_i) over parameters (float64 reference)."""
    s = {k: v.double() for k, v in p.items() if v.is_floating_point()}
    for i, t in enumerate(tickets, start=1):
        s = {k: (i / (i + 1)) * v + (1 / (i + 1)) * t[k].double() for k, v in s.items()}
        flat = torch.cat([s[n].reshape(-1).abs() for n in names])
        order = torch.sort(-flat, stable=True).indices[:keep]
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[order] = True
        offset = 0
        for n in names:
            k = s[n].numel()
            s[n] = s[n] * mask[offset : offset + k].view(s[n].shape)
            offset += k
    return s


@pytest.mark.parametrize("method", ["rigl", "granet"])
def test_ticket_events_at_planned_steps(method: str) -> None:
    hooks = Timeline()
    extra = [f"--sparse.method={method}", "--tickets.reexplore_fraction=0"]
    if method == "granet":
        extra += ["--sparse.granet_initial_density=0.4", "--sparse.granet_prune_end_epoch=3"]
    model, engine = train_cnn(extra, seed=0, hooks=hooks)
    plan = engine.plan
    pre, cyc = plan.pre_steps, plan.cycle_steps
    assert (pre, cyc) == (40, 10)
    kinds = [e[0] for e in hooks.events]
    assert kinds == ["P", "T", "BN", "S", "T", "BN", "S"]
    assert hooks.events[0] == ("P", pre)
    tickets = [e for e in hooks.events if e[0] == "T"]
    assert [(e[1], e[2]) for e in tickets] == [(pre + cyc, 0), (pre + 2 * cyc, 1)]
    for e in tickets:
        assert e[3] == 0.002 and e[4] == 0.002  # every ticket is taken at lr_low
    assert [e[1:] for e in hooks.events if e[0] == "S"] == [(pre + cyc, 0), (pre + 2 * cyc, 1)]
    assert engine.num_tickets == 2
    # the final model is S_2 with exactly floor(d N) target weights
    n_total = engine.total_target_weights
    keep = math.floor(0.1 * n_total)
    assert engine.final_keep == keep
    assert engine.masks.total_active() == keep
    assert engine.masks.density(engine.targets) == keep / n_total
    nonzero = sum(int((model.get_parameter(n) != 0).sum()) for n in CNN_NAMES)
    assert nonzero <= keep
    for n in CNN_NAMES:
        assert bool((model.get_parameter(n)[~engine.masks.masks[n]] == 0).all())
    # and its parameters are the CAA recursion over P, T_1, T_2 with re-prune
    expected = _hand_superposition(hooks.snap_p, hooks.snap_t, CNN_NAMES, keep)
    for name, p in model.named_parameters():
        assert torch.allclose(p.double(), expected[name], rtol=0, atol=1e-6), name
    # the final masks are S's masks, and the optimizer state outside them is zero
    for n in CNN_NAMES:
        assert torch.equal(engine.masks.masks[n], engine.chain.masks[n])
        p = model.get_parameter(n)
        for v in engine.backend.optimizer.state[p].values():
            if torch.is_tensor(v) and v.shape == p.shape:
                assert bool((v[~engine.masks.masks[n]] == 0).all())


# --- (e) torch.compile -------------------------------------------------------------------------
def test_compiled_model_same_masks_as_eager() -> None:
    overrides = [
        "--sparse.method=rigl",
        "--sparse.density=0.3",
        "--sparse.update_interval=5",
        "--schedule.epochs=12",
        "--schedule.batch_size=16",
        "--tickets.num_cycles=0",
        "--schedule.lr_schedule=constant",
    ]
    x, y = torch.randn(16, 10, dtype=torch.float64), torch.randint(0, 5, (16,))
    eager = mlp(dtype=torch.float64)
    base = copy.deepcopy(eager)
    compiled = torch.compile(base, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    try:
        _compare_compiled(overrides, x, y, eager, base, compiled)
    finally:
        torch._dynamo.reset()


def _compare_compiled(overrides, x, y, eager, base, compiled) -> None:
    runs = []
    for module, params in ((eager, eager.parameters()), (compiled, base.parameters())):
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        log = UpdateLog()
        engine = make_engine(overrides, module, opt, MLP_NAMES, 16, hooks=log, base_lr=0.05)
        runs.append((module, opt, engine, log))
    (_, _, e_eager, log_eager), (_, _, e_comp, log_comp) = runs
    # names are normalised: the targets alias the compiled module's parameters
    assert [t.name for t in e_comp.targets] == MLP_NAMES
    assert e_comp.targets[0].param.data_ptr() == base[0].weight.data_ptr()
    assert e_comp.plan.total_steps == 12
    init = masks_of(e_eager)
    assert same_masks(init, masks_of(e_comp))
    for _ in range(e_eager.plan.total_steps):
        for module, opt, engine, _ in runs:
            opt.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            set_lr(opt, engine.lr())
            engine.before_optimizer_step()
            opt.step()
            engine.after_optimizer_step()
        assert same_masks(masks_of(e_eager), masks_of(e_comp)), e_eager.step
        for p, q in zip(eager.parameters(), base.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-10)
    assert [(k, s) for k, s, _ in log_comp.updates] == [("update", 5), ("update", 10)]
    assert [(k, s) for k, s, _ in log_eager.updates] == [("update", 5), ("update", 10)]
    assert not same_masks(init, log_comp.updates[-1][2])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really ran compiled
    for n in MLP_NAMES:  # masked weights of the compiled model are zero too
        assert bool((base.get_parameter(n)[~e_comp.masks.masks[n]] == 0).all())


def train_small_cnn(model, opt, engine, steps: int, gen: torch.Generator) -> None:
    """``steps`` optimizer steps of ``SmallCNN`` on random 8x8 batches of 16 drawn from ``gen``."""
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        engine.before_optimizer_step()
        opt.step()
        engine.after_optimizer_step()
        opt.zero_grad()


def test_state_dict_round_trip_with_and_without_init_masks():
    """The engine's state (counters, masks, chain keyed by name) restores into a fresh engine,
    whether or not that engine drew initial masks first."""
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    overrides = ["--sparse.update_interval=2", "--schedule.epochs=1", "--schedule.batch_size=16"]
    overrides.append("--tickets.num_cycles=1")
    engine = make_engine([*overrides, "--tickets.cycles_fraction=0.5"], model, opt, SmallCNN.TARGETS, 8 * 16)
    train_small_cnn(model, opt, engine, 6, torch.Generator().manual_seed(2))  # the chain holds P (step 4)
    state = engine.state_dict()
    assert state["step"] == 6 and state["chain"] is not None
    for init_first in (True, False):
        copy_model = copy.deepcopy(model)
        copy_opt = torch.optim.SGD(copy_model.parameters(), lr=0.1)
        cfg = load_config(None, [*overrides, "--tickets.cycles_fraction=0.5"])
        other = SupTicketsEngine.from_config(
            cfg, resolve_plan(cfg, 8 * 16), LocalBackend(copy_model, copy_opt, SmallCNN.TARGETS)
        )
        if init_first:
            other.init_masks()
        other.load_state_dict(state)
        assert other.step == 6 and same_masks(masks_of(other), masks_of(engine))
        assert other.masks.counts == engine.masks.counts
        assert other.chain.num_merged == engine.chain.num_merged
        assert all(torch.equal(other.chain.tensors[n], t) for n, t in engine.chain.tensors.items())
