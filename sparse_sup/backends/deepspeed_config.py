"""Fill a DeepSpeed JSON's "auto" values from the training config (plain ``deepspeed.initialize``
does not resolve them) and refuse values that contradict it."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, ConfigError


def _set(section: dict, key: str, value, where: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(
            f"DeepSpeed config {where}{key}={current!r} contradicts the training config, which implies "
            f'{value!r}; set it to "auto" or change the training config'
        )


def refuse_offload(devices: dict[str, object]) -> None:
    """``devices``: ``offload_optimizer`` / ``offload_param`` -> device (None, "none", "cpu", "nvme" or
    DeepSpeed's enum). Offloading keeps the fp32 masters and optimizer state where the masks cannot
    reach them in place (DeepSpeed's accessors return copies there): refused, not silently wrong."""
    for key, device in devices.items():
        device = str(getattr(device, "value", device) or "none").lower()
        if device != "none":
            raise ConfigError(
                f"DeepSpeed zero_optimization.{key} on {device!r} is not supported: sparse_sup applies the "
                "masks to the fp32 master weights and optimizer state where the update lands, and with "
                "offloading DeepSpeed exposes those only as copies. Remove zero_optimization."
                f"{key} from the DeepSpeed config (ZeRO-3 without offload shards the masters instead)"
            )


def fill_deepspeed_config(source: str | Path | dict, config: Config, world_size: int) -> dict:
    """The DeepSpeed config (a JSON path, or the dict of Accelerate's DeepSpeed plugin, filled in
    place) with every training-config-derived value filled in."""
    if isinstance(source, dict):
        ds = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"--deepspeed {str(path)!r}: no such file")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--deepspeed {str(path)!r} is not valid JSON: {e}") from e
    zero = ds.get("zero_optimization") or {}
    refuse_offload(
        {key: (zero.get(key) or {}).get("device") for key in ("offload_optimizer", "offload_param")}
    )
    s = config.schedule
    per_step = world_size * s.grad_accum_steps
    if s.batch_size % per_step:
        raise ConfigError(
            f"schedule.batch_size={s.batch_size} is not divisible by world size x schedule.grad_accum_steps "
            f"= {per_step}"
        )
    _set(ds, "train_batch_size", s.batch_size, "")
    _set(ds, "train_micro_batch_size_per_gpu", s.batch_size // per_step, "")
    _set(ds, "gradient_accumulation_steps", s.grad_accum_steps, "")
    _set(ds, "gradient_clipping", float(config.optim.max_grad_norm or 0.0), "")
    for precision in ("bf16", "fp16"):
        section = ds.setdefault(precision, {})
        _set(section, "enabled", config.train.precision == precision, f"{precision}.")
    if config.train.precision in ("bf16", "fp16"):
        # DeepSpeed 0.19 casts the parameters only; BatchNorm then meets fp32 running statistics
        # beside 16-bit weights, which its kernel rejects ("expected scalar type BFloat16 but found
        # Float"). Buffers in the training dtype, as DeepSpeed cast them before; a set value wins
        data_types = ds.setdefault("data_types", {})
        if data_types.get("buffer_dtype", "auto") == "auto":
            data_types["buffer_dtype"] = config.train.precision
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(
            f"DeepSpeed zero_optimization.stage={stage}: sparse_sup supports ZeRO stages 1, 2, 3"
        )
    ds["zero_allow_untested_optimizer"] = True  # the optimizer is a plain torch one
    ds.setdefault("steps_per_print", 10**9)
    return ds
