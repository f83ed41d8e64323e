"""The DST-method seam: methods are registered classes; the config's choices and the engine read
the registry, so a new method is one class (here one defined in the test) and no engine change."""

from __future__ import annotations

import pytest
import torch
from test_engine import MLP_NAMES, MLP_RUN, UpdateLog, make_engine, mlp

from sparse_sup.config import ConfigError, load_config
from sparse_sup.methods import METHODS, DSTMethod, register_method

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_published_methods_are_registered() -> None:
    assert {name: cls.grow for name, cls in METHODS.items()} == {
        "set": "random",
        "rigl": "gradient",
        "granet": "gradient",
    }


def test_method_specific_checks_live_with_the_method() -> None:
    with pytest.raises(ConfigError, match=r"sparse\.granet_initial_density=0\.05 is invalid"):
        load_config(
            None, ["--sparse.method=granet", "--sparse.density=0.1", "--sparse.granet_initial_density=0.05"]
        )


@pytest.fixture
def one_shot_method():
    """A method the package does not ship: random regrowth from a dense-ish start, pruned once,
    globally, halfway through phase 1 and again (to the target) where phase 1 ends."""

    @register_method
    class OneShotSET(DSTMethod):
        name = "one-shot-set"
        grow = "random"

        @property
        def initial_density(self) -> float:
            return 0.6

        def prune_density(self, completed: int) -> float | None:
            if completed == self.plan.pre_steps:
                return self.sparse.density
            return 0.4 if completed == self.plan.pre_steps // 2 else None

    yield OneShotSET
    del METHODS[OneShotSET.name]


def test_a_new_method_is_one_registered_class(one_shot_method) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hooks = UpdateLog()
    run = [o for o in MLP_RUN if not o.startswith("--sparse.method")]
    engine = make_engine([*run, "--sparse.method=one-shot-set"], model, opt, MLP_NAMES, 160, hooks=hooks)
    total = engine.total_target_weights
    assert engine.masks.total_active() == round(0.6 * total)
    x, y = torch.randn(32, 10, dtype=torch.float64), torch.randint(0, 5, (32,))
    active = {}
    while engine.step < engine.plan.total_steps:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        engine.before_optimizer_step()
        opt.step()
        engine.after_optimizer_step()
        active[engine.step] = engine.masks.total_active()
    pre = engine.plan.pre_steps
    prunes = [step for kind, step, _ in hooks.updates if kind == "prune"]
    assert prunes == [pre // 2, pre]
    assert active[pre // 2 - 1] == round(0.6 * total) and active[pre // 2] == round(0.4 * total)
    assert active[pre] == round(0.2 * total)
