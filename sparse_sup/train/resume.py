"""``--resume auto|PATH``: which run checkpoint to continue from, checked before anything is written.

``auto`` continues the newest complete checkpoint of ``experiment.output_dir`` and starts afresh
when there is none (so a preemptible job can always be launched with the same command); when there
are checkpoints but none is intact it refuses (exit 2) instead of restarting over the run; a PATH is a
checkpoint directory or a run directory (its newest complete checkpoint). The run's config must be
the one it was started with, except keys that do not change the result."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from ..checkpoint.run_state import (
    MANIFEST,
    CheckpointError,
    latest_checkpoint,
    read_checkpoint_manifest,
    verify_checkpoint,
    world_size_problem,
)
from ..config import Config, ConfigError, config_to_dict

log = logging.getLogger(__name__)

# keys that may differ between the original and the resumed launch
FREE_KEYS = {
    ("experiment", "overwrite"),
    ("train", "max_steps"),
    ("train", "progress_bar"),
    ("train", "log_every"),
    ("train", "report_to"),
    ("data", "num_workers"),
    ("data", "pin_memory"),
    ("data", "on_device"),
    ("checkpoint", "every_steps"),
    ("checkpoint", "keep_last"),
}


def run_dir_of(resume: str, config: Config) -> Path:
    """The run directory a ``--resume`` value refers to."""
    if resume == "auto":
        if not config.experiment.output_dir:
            raise ConfigError(
                "--resume auto needs a fixed run directory: set --experiment.output_dir=DIR (the default "
                "directory name has a timestamp, so a relaunch would not find the run)"
            )
        return Path(config.experiment.output_dir)
    path = Path(resume)
    if (path / MANIFEST).is_file() or path.parent.name == "checkpoints":
        return path.parent.parent
    return path


def check_same_config(run_dir: Path, config: Config) -> None:
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    saved, now = yaml.safe_load(saved_file.read_text()) or {}, config_to_dict(config)
    differ = [
        f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in now.items()
        for key, value in values.items()
        if (section, key) not in FREE_KEYS and saved.get(section, {}).get(key) != value
    ]
    if differ:
        raise ConfigError(
            f"--resume: the config differs from the one {run_dir} was started with "
            f"({'; '.join(differ[:3])}); "
            f"resume with the run's own config (--config {saved_file}) or start a new run"
        )


def resolve_resume(resume: str, config: Config) -> Path | None:
    """The checkpoint to load, or None for a fresh start (``auto`` with no checkpoint yet)."""
    run_dir = run_dir_of(resume, config)
    if resume != "auto" and not run_dir.is_dir():
        raise ConfigError(f"--resume {resume}: no such run directory or checkpoint")
    check_same_config(run_dir, config)
    path = Path(resume)
    if resume != "auto" and ((path / MANIFEST).is_file() or path.parent.name == "checkpoints"):
        problems = verify_checkpoint(path)  # collective: every rank hashes a share of the files
        if problems:
            raise ConfigError(f"--resume {resume}: {problems[0]}; pass the run directory to fall back")
        check_world_size(path)
        return path
    try:
        chosen = latest_checkpoint(run_dir)
    except CheckpointError as e:  # checkpoints exist, none intact: never restart over the run
        raise ConfigError(f"--resume {resume}: {e}") from None
    if chosen is None and resume != "auto":
        raise ConfigError(f"--resume {resume}: no checkpoint in {run_dir / 'checkpoints'}; start a new run")
    if chosen is None:
        log.info("--resume auto: no checkpoint in %s yet; starting from step 0", run_dir)
    else:
        check_world_size(chosen)
    return chosen


def check_world_size(path: Path) -> None:
    """Refuse, before anything is written, a checkpoint that cannot resume at this world size."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    problem = world_size_problem(read_checkpoint_manifest(path), world)
    if problem:
        raise ConfigError(f"--resume: checkpoint {path} {problem}")
