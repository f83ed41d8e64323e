"""Cheap tickets: the superposition side chain, global re-prune and BatchNorm recalibration."""

from .batchnorm import Discard, recalibrate_batchnorm
from .superpose import MERGE_RULES, SuperpositionChain

__all__ = ["Discard", "MERGE_RULES", "SuperpositionChain", "recalibrate_batchnorm"]
