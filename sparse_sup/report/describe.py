"""What a file or directory written by sparse_sup holds, and whether it is intact (``sparse-sup inspect``).

One reader per kind of path, tried in order; a new format is one more entry in ``READERS``. Readers
read formats only through ``sparse_sup.checkpoint`` and never load more than the masks' bit counts
where a manifest records them. ``describe(path)`` returns a plain dict (JSON-ready):

    kind, path, model, label, step, phase, cycle, world_size, density, layer_density,
    files: [{"path", "ok", "problem"}], problems: [...], children: [describe(...) ...] (run directories)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

_LABEL = re.compile(r"^(T|S)_(\d+)$")


@dataclass(frozen=True)
class Reader:
    kind: str
    matches: Callable[[Path], bool]
    read: Callable[[Path], dict]


def _blank(kind: str, path: Path) -> dict:
    return {
        "kind": kind,
        "path": str(path),
        "model": None,
        "label": None,
        "step": None,
        "phase": None,
        "cycle": None,
        "world_size": None,
        "density": None,
        "layer_density": {},
        "files": [],
        "problems": [],
        "children": [],
    }


def _phase_of_label(label: str | None) -> tuple[str | None, int | None]:
    if label == "P":
        return "end of phase 1 (P)", None
    m = _LABEL.match(label or "")
    if m:
        return ("ticket (cycle end)" if m.group(1) == "T" else "superposed"), int(m.group(2))
    if label and label.startswith(("S_", "final")):
        return "final", None
    return None, None


def _phase_of_step(step: int, plan: dict) -> tuple[str, int | None]:
    pre, total = plan["pre_steps"], plan["total_steps"]
    if step >= total:
        return "done", None
    if step < pre or not plan.get("num_cycles"):
        return "phase 1 (DST)", None
    return "cycles", min((step - pre) // plan["cycle_steps"], plan["num_cycles"] - 1) + 1


def _file(path: Path, problem: str | None) -> dict:
    return {"path": str(path), "ok": problem is None, "problem": problem}


# ---- sharded model checkpoints: tickets, P, S_i, the final model --------------------------------
def _is_sharded(path: Path) -> bool:
    if not (path.is_dir() and (path / "manifest.json").is_file()):
        return False
    try:
        return json.loads((path / "manifest.json").read_text()).get("format") == "sparse_sup.sharded"
    except (ValueError, OSError):
        return True  # a corrupt manifest: the reader reports it


def read_sharded(path: Path) -> dict:
    from ..checkpoint import CheckpointError, read_manifest, verify_sharded

    out = _blank("sharded checkpoint", path)
    problems = verify_sharded(path)
    out["problems"] = problems
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        out["files"] = [_file(path / "manifest.json", str(e))]
        return out
    for file in [path / "manifest.json", *(path / r["name"] for r in manifest["files"])]:
        out["files"].append(_file(file, next((p for p in problems if p.startswith(f"{file}:")), None)))
    meta = manifest.get("meta", {})
    out.update(model=meta.get("model"), label=meta.get("label"), step=meta.get("step"))
    out["world_size"] = manifest["world_size"]
    out["phase"], out["cycle"] = _phase_of_label(out["label"])
    active: dict[str, int] = {}
    for record in manifest["files"]:  # masks' bit counts, from the manifest: nothing else is read
        for e in record["entries"]:
            if "mask" in e:
                active[e["tensor"]] = active.get(e["tensor"], 0) + e["active"]
    tensors = manifest["tensors"]
    targets = meta.get("targets") or [n for n, t in tensors.items() if t.get("masked")]
    layers = {
        n: active.get(n, 0) / tensors[n]["numel"] for n in targets if n in tensors and tensors[n]["masked"]
    }
    out["layer_density"] = layers
    if layers:
        out["density"] = sum(active.get(n, 0) for n in layers) / sum(tensors[n]["numel"] for n in layers)
    return out


# ---- run checkpoints (resume) -----------------------------------------------------------------
def _is_run_checkpoint(path: Path) -> bool:
    if not (path.is_dir() and (path / "manifest.json").is_file()):
        return False
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (ValueError, OSError):
        return path.name.startswith("step_")
    return isinstance(manifest.get("files"), dict) and "step" in manifest


def read_run_checkpoint(path: Path) -> dict:
    from ..checkpoint.run_state import checkpoint_problems

    out = _blank("run checkpoint", path)
    problems = checkpoint_problems(path)
    out["problems"] = problems
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (ValueError, OSError):
        out["files"] = [_file(path / "manifest.json", problems[0] if problems else "unreadable")]
        return out
    for file in [path / "manifest.json", *(path / name for name in manifest["files"])]:
        out["files"].append(_file(file, next((p for p in problems if p.startswith(f"{file}:")), None)))
    out["step"], out["world_size"] = manifest.get("step"), manifest.get("world_size")
    run_dir = path.parent.parent
    plan = _run_plan(run_dir)
    if plan and out["step"] is not None:
        out["phase"], out["cycle"] = _phase_of_step(out["step"], plan)
    config = _run_config(run_dir)
    out["model"] = config.get("model", {}).get("name")
    # the masks of this step as the run recorded them (the files hold them per rank, in local pieces)
    out["density"], out["layer_density"] = _densities_at(run_dir, out["step"])
    return out


# ---- whole-tensor ticket files (tickets/ticket_i.pt + .sha256) ---------------------------------
def _is_torch_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".pt"


def read_torch_file(path: Path) -> dict:
    import torch

    from ..checkpoint import load_verified

    out = _blank("ticket file", path)
    digest = path.with_name(path.name + ".sha256")
    try:
        state = load_verified(path)
    except (ValueError, RuntimeError, OSError, EOFError) as e:
        out["files"] = [_file(path, str(e).split("\n")[0])]
        out["problems"] = [out["files"][0]["problem"]]
        return out
    out["files"] = [_file(path, None), _file(digest, None)]
    meta = state.get("meta", {}) if isinstance(state, dict) else {}
    out.update(label=meta.get("label"), step=meta.get("step"), model=meta.get("model"))
    out["world_size"] = meta.get("world_size")
    out["phase"], out["cycle"] = _phase_of_label(out["label"])
    masks = state.get("masks", {}) if isinstance(state, dict) else {}
    layers = {n: float(m.sum()) / m.numel() for n, m in masks.items() if isinstance(m, torch.Tensor)}
    out["layer_density"] = layers
    if layers:
        out["density"] = sum(float(masks[n].sum()) for n in layers) / sum(masks[n].numel() for n in layers)
    return out


# ---- the final export (plain state_dict in safetensors) ----------------------------------------
def _is_safetensors(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def read_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    out = _blank("safetensors export", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            # no mask is stored: a weight is counted active when it is nonzero
            layers = {}
            for name in f.keys():
                t = f.get_tensor(name)
                if t.dim() >= 2 and t.is_floating_point():
                    layers[name] = (float((t != 0).sum()), t.numel())
    except Exception as e:  # safetensors raises its own error types for a damaged header
        out["files"] = [_file(path, f"unreadable ({e.__class__.__name__}: {e})")]
        out["problems"] = [f"{path}: {out['files'][0]['problem']}"]
        return out
    out["files"] = [_file(path, None)]
    out["model"], out["label"] = meta.get("model"), "export"
    out["layer_density"] = {n: a / n_ for n, (a, n_) in layers.items()}
    if layers:
        out["density"] = sum(a for a, _ in layers.values()) / sum(n_ for _, n_ in layers.values())
    out["note"] = "no checksum stored in safetensors: header and sizes checked; density counts nonzeros"
    return out


# ---- run directories --------------------------------------------------------------------------
def _run_config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _run_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _metrics(run_dir: Path) -> list[dict]:
    records = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _run_plan(run_dir: Path) -> dict | None:
    summary = _run_summary(run_dir)
    if summary:
        return summary["plan"]
    schedule = [r for r in _metrics(run_dir) if r.get("event") == "schedule"]
    return schedule[-1] if schedule else None


def _densities_at(run_dir: Path, step: int | None) -> tuple[float | None, dict[str, float]]:
    """Overall and per-layer density of the last mask record at or before ``step`` (None: the last)."""
    found: dict = {}
    for r in _metrics(run_dir):
        if "layer_density" in r and (step is None or r.get("step", 0) <= step):
            found = r
    layers = found.get("layer_density", {})
    return found.get("density"), layers


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file()


def read_run_dir(path: Path) -> dict:
    out = _blank("run directory", path)
    config, summary = _run_config(path), _run_summary(path)
    out["model"] = config.get("model", {}).get("name")
    records = _metrics(path)
    if summary:
        out["step"], out["world_size"] = summary["steps_completed"], summary["world_size"]
        out["label"] = summary.get("final_is")
    else:
        steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
        out["step"] = max(steps) if steps else None
        out["problems"].append(f"{path / 'summary.json'}: missing (the run has not finished)")
    plan = _run_plan(path)
    if plan and out["step"] is not None:
        out["phase"], out["cycle"] = _phase_of_step(out["step"], plan)
    out["density"], out["layer_density"] = _densities_at(path, None)
    children = []
    for sub in ("tickets", "final", "checkpoints"):
        folder = path / sub
        if folder.is_dir():
            children += [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    for child in children:
        reader = reader_for(child)
        if reader is not None and reader.kind != "run directory":
            described = reader.read(child)
            out["children"].append(described)
            out["problems"] += described["problems"]
    out["children"].sort(key=_order)
    return out


def _order(d: dict) -> tuple:
    """Checkpoints in the order they were written: by step, then P, T_i, S_i, the rest."""
    label = d["label"] or ""
    rank = {"P": 0, "T": 1, "S": 2}.get(label.split("_", 1)[0], 3)
    return (d["step"] is None, d["step"] or 0, rank, d["path"])


READERS: list[Reader] = [
    Reader("run directory", _is_run_dir, read_run_dir),
    Reader("sharded checkpoint", _is_sharded, read_sharded),
    Reader("run checkpoint", _is_run_checkpoint, read_run_checkpoint),
    Reader("ticket file", _is_torch_file, read_torch_file),
    Reader("safetensors export", _is_safetensors, read_safetensors),
]


def reader_for(path: Path) -> Reader | None:
    return next((r for r in READERS if r.matches(path)), None)


def describe(path: str | Path) -> dict:
    """Raises FileNotFoundError for a missing path, ValueError for a path no reader knows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    reader = reader_for(path)
    if reader is None:
        kinds = ", ".join(r.kind for r in READERS)
        raise ValueError(f"{path}: not something sparse_sup wrote (inspect reads: {kinds})")
    return reader.read(path)
