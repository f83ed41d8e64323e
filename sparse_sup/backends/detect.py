"""Which engine runs this job, read from Accelerate's state (never configured twice)."""

from __future__ import annotations

import os


def detect_parallelism(accelerator, deepspeed_launcher: bool = False) -> str:
    """'deepspeed' under the deepspeed launcher (--deepspeed) or Accelerate's DeepSpeed plugin;
    'fsdp2' when Accelerate was launched with an FSDP config (on GPUs Accelerate shards the model
    itself; on CPU, where Accelerate ignores its FSDP plugin, we apply ``fully_shard``); 'ddp' for
    several processes; else 'single'."""
    from accelerate.utils import DistributedType

    if deepspeed_launcher or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if accelerator.distributed_type == DistributedType.FSDP or os.environ.get(
        "ACCELERATE_USE_FSDP", ""
    ).lower() in ("1", "true"):
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


def accelerate_shards_model(accelerator) -> bool:
    """True when Accelerate's own FSDP plugin applies ``fully_shard`` in ``prepare()`` (GPUs)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP
