"""The DST-method seam: one class per method, registered by name (like torch.ao.pruning's
sparsifiers). The engine asks a method three things and knows no method by name:

- ``initial_density``: the density the masks start at;
- ``grow``: the regrowth criterion of a topology update (a key of ``core.topology.GROW_CRITERIA``);
- ``prune_density(completed)``: the global density to prune to right after ``completed`` optimizer
  steps, before that step's topology update (None: no global prune).

A new method is one file with a subclass decorated ``@register_method`` (imported by
``methods/__init__.py``); the config's ``sparse.method`` choices read ``METHODS``."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ..config.plan import StepPlan
    from ..config.schema import SparseConfig

METHODS: dict[str, type[DSTMethod]] = {}


def register_method(cls: type[DSTMethod]) -> type[DSTMethod]:
    if cls.name in METHODS:
        raise ValueError(f"DST method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


class DSTMethod:
    """A fixed-density method (SET, RigL): masks start at ``sparse.density`` and keep it."""

    name: ClassVar[str]
    grow: ClassVar[str]  # regrowth criterion at topology updates ("random", "gradient")

    def __init__(self, sparse: SparseConfig, plan: StepPlan) -> None:
        self.sparse, self.plan = sparse, plan

    @classmethod
    def check_config(cls, sparse: SparseConfig) -> None:
        """Method-specific checks of ``sparse.*`` (raise ``ConfigError`` naming the key)."""

    @property
    def initial_density(self) -> float:
        return self.sparse.density

    def prune_density(self, completed: int) -> float | None:
        return None


def create_method(sparse: SparseConfig, plan: StepPlan) -> DSTMethod:
    return METHODS[sparse.method](sparse, plan)
