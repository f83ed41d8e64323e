"""Which engine runs this job, read from Accelerate's state (never configured twice)."""

from __future__ import annotations

import os


def detect_parallelism(accelerator) -> str:
    """'fsdp2' when Accelerate was launched with an FSDP config (on GPUs Accelerate shards the
    model itself; on CPU, where Accelerate ignores its FSDP plugin, we apply ``fully_shard``),
    'ddp' for several processes, else 'single'."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise NotImplementedError("DeepSpeed is not supported yet (see the DeepSpeed issue)")
    if accelerator.distributed_type == DistributedType.FSDP or os.environ.get(
        "ACCELERATE_USE_FSDP", ""
    ).lower() in ("1", "true"):
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


def accelerate_shards_model(accelerator) -> bool:
    """True when Accelerate's own FSDP plugin applies ``fully_shard`` in ``prepare()`` (GPUs)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP
