"""Which engine runs this job, read from Accelerate's state (never configured twice)."""

from __future__ import annotations

import os


def detect_parallelism(accelerator, deepspeed_launcher: bool = False) -> str:
    """'deepspeed' under the deepspeed launcher (--deepspeed) or Accelerate's DeepSpeed plugin;
    'fsdp2' when Accelerate was launched with an FSDP config (sparse_sup then applies
    ``fully_shard`` itself, on CPU and GPUs: ``fsdp2_shard_model``); 'ddp' for several processes;
    else 'single'."""
    from accelerate.utils import DistributedType

    if deepspeed_launcher or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if accelerator.distributed_type == DistributedType.FSDP or os.environ.get(
        "ACCELERATE_USE_FSDP", ""
    ).lower() in ("1", "true"):
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"
