"""Model factory and sparsification-target selection.

Importing this package registers ``vgg19_bn_cifar`` and ``resnet32_cifar`` with timm.
"""

from . import resnet_cifar, vgg_cifar  # noqa: F401  (timm registration side effect)
from .cifar_stem import apply_cifar_stem
from .factory import build_model
from .targets import normalize_name, select_targets
from .vgg_cifar import VGGCifar

__all__ = ["build_model", "select_targets", "normalize_name", "apply_cifar_stem", "VGGCifar"]
