"""Atomic, verifiable files: write to a temporary name, fsync, rename, fsync the directory; a
SHA-256 of the payload is stored beside it (``<path>.sha256``) so a truncated or corrupt file is
detected instead of half-loaded.

Temporaries carry their writer (``<pid>@<host>``): a save removes the ones a crashed writer left
behind (``remove_stale``), never those of a writer that still runs."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_OWNER = re.compile(r"-(\d+)@([^@/]+)$")


def owner_tag() -> str:
    """Suffix for a temporary name: who writes it."""
    return f"-{os.getpid()}@{socket.gethostname()}"


def is_stale(name: str) -> bool:
    """True when the temporary ``name`` belongs to no live writer: its ``<pid>@<host>`` names this
    host and a pid that is not running, or it names no owner (left by a version before owners were
    recorded). A writer on another host cannot be checked from here, so its temporaries are kept
    (a save on that host removes them). A reused pid keeps a stale one a little longer: harmless.
    Pids are only comparable within one pid namespace: containers that share a filesystem need
    hostnames of their own (the default in Docker and Kubernetes)."""
    found = _OWNER.search(name)
    if found is None:
        return True
    pid, host = int(found.group(1)), found.group(2)
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def temporary_of(prefix: str):
    """Predicate: a name is ``prefix`` + an owner tag (or + a bare pid, the form before owners)."""
    return lambda name: name.startswith(prefix) and re.fullmatch(r"\d+|-\d+@[^@/]+", name[len(prefix) :])


def remove_stale(parent: Path, matches) -> list[Path]:
    """Delete the entries of ``parent`` whose name ``matches`` (a predicate) and that ``is_stale``."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if matches(entry.name) and is_stale(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.info("removed %d temporary file(s) of crashed saves in %s", len(removed), parent)
    return removed


def _fsync_dir(path: Path) -> None:
    """Make a rename (or a new entry) in ``path`` durable: without it, a power loss after
    ``os.replace`` may bring back the old name although the data was fsynced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp"
    remove_stale(path.parent, temporary_of(prefix))  # left by a crashed write of this file
    tmp = path.with_name(prefix + owner_tag())
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _accepted_digests(path: Path) -> list[str]:
    """The digests ``<path>.sha256`` accepts (one line each; two while a write is in flight)."""
    try:
        return _sidecar(path).read_text().split()
    except FileNotFoundError:
        return []


def _published_digest(path: Path) -> str | None:
    """The digest of the intact version now at ``path``, or None (absent, unverifiable, corrupt)."""
    accepted = _accepted_digests(path)
    if not accepted or not path.is_file():
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest if digest in accepted else None


def sidecar_text(digest: str) -> bytes:
    """The content ``atomic_torch_save`` leaves in ``<path>.sha256`` once it returned ``digest``."""
    return digest.encode()


def atomic_torch_save(obj: object, path: str | Path) -> str:
    """torch.save ``obj`` atomically; writes ``<path>.sha256`` and returns the digest.

    Payload and checksum are two files, and no rename publishes two files at once, so the order
    makes every crash point leave either the old version or the new one verifiable, never a good
    file that looks corrupt:

    1. the checksum file is published first, accepting the new digest *and* the digest of the
       version now on disk (only when that version is intact);
    2. the payload is published;
    3. the checksum file is rewritten with the new digest only (skipped when nothing was there).

    A crash before 1 leaves the old pair. Between 1 and 2: the old payload, accepted by its old
    digest (or, for a first write, a checksum file without a payload: "missing", as it should be).
    Between 2 and 3: the new payload, accepted by the new digest. Each step is a rename of an
    fsynced temporary followed by an fsync of the directory, so the order also holds after a power
    loss. Corruption is still caught: a damaged payload matches neither digest.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    current = _published_digest(path)
    accepted = [digest] + ([current] if current not in (None, digest) else [])
    _atomic_write_bytes(_sidecar(path), "\n".join(accepted).encode())
    _atomic_write_bytes(path, payload)
    if len(accepted) > 1:
        _atomic_write_bytes(_sidecar(path), sidecar_text(digest))
    return digest


def load_verified(path: str | Path, map_location: str | torch.device = "cpu") -> object:
    """Load a file written by ``atomic_torch_save``; raise if it does not match its digest."""
    path = Path(path)
    payload = path.read_bytes()
    digest_file = _sidecar(path)
    if not digest_file.exists():
        raise ValueError(f"{path}: no checksum file {digest_file.name}; refusing an unverifiable checkpoint")
    if hashlib.sha256(payload).hexdigest() not in _accepted_digests(path):
        raise ValueError(f"{path} is corrupt or truncated (SHA-256 mismatch); re-create it")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def save_model_snapshot(path: str | Path, model_state: dict, masks: dict, meta: dict) -> str:
    """A ticket / superposed model: weights and buffers (BN state included), masks, metadata."""
    state = {k: v.detach().cpu().clone() for k, v in model_state.items()}
    return atomic_torch_save(
        {"model": state, "masks": {k: v.cpu().clone() for k, v in masks.items()}, "meta": meta}, path
    )


def export_safetensors(path: str | Path, model_state: dict, meta: dict) -> None:
    """Plain state_dict in safetensors (loadable with ``model.load_state_dict`` on a timm model
    built with the same arguments); masks are implied by the zeros and not needed to run it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()}
    prefix = f".{path.name}.tmp"
    remove_stale(path.parent, temporary_of(prefix))
    tmp = path.with_name(prefix + owner_tag())
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    with open(tmp, "rb") as f:  # save_file does not fsync: the rename must not outrun the data
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
