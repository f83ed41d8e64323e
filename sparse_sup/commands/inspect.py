"""``sparse-sup inspect PATH``: what a run directory, ticket, run checkpoint or export holds, and a
checksum check of every file in it. Exit code 1 names every corrupt or missing file."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "show what a run directory, ticket, checkpoint or export holds, and verify its checksums"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Model, step, phase, cycle, overall and per-layer density, the world size it was written "
        "with, and a checksum check of every file. Exit code 0: intact; 1: a file is corrupt or missing."
    )
    parser.add_argument(
        "path", help="run directory, ticket (directory or .pt), run checkpoint, or .safetensors"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--layers", action="store_true", help="also list every layer's density")


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _overview(d: dict) -> list[list[str]]:
    listed = d["files"] or [f for c in d["children"] for f in c["files"]]  # a run directory: all of them
    files = f"{sum(f['ok'] for f in listed)}/{len(listed)} ok" if listed else "-"
    phase = d["phase"] if d["cycle"] is None else f"{d['phase']} {d['cycle']}"
    return [
        d["path"],
        d["kind"],
        _fmt(d["label"]),
        _fmt(d["step"]),
        _fmt(phase),
        _fmt(d["density"]),
        _fmt(d["world_size"]),
        files,
    ]


def render(d: dict, layers: bool) -> str:
    header = ["path", "kind", "label", "step", "phase", "density", "world size", "checksums"]
    parts = [f"{d['kind']}: {d['path']}", f"model: {_fmt(d['model'])}", ""]
    parts.append(_table([_overview(d)] + [_overview(c) for c in d["children"]], header))
    if d.get("note"):
        parts += ["", f"note: {d['note']}"]
    if d["layer_density"]:
        values = list(d["layer_density"].values())
        parts += ["", f"{len(values)} sparsified layers, density {min(values):.4f} .. {max(values):.4f}"]
        if layers:
            parts.append(
                _table([[n, f"{v:.4f}"] for n, v in d["layer_density"].items()], ["layer", "density"])
            )
    problems = d["problems"]
    parts += ["", "all files intact" if not problems else f"{len(problems)} problem(s):"]
    parts += [f"  {p}" for p in problems]
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    from ..report.describe import describe

    try:
        d = describe(args.path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(d, indent=1) if args.json else render(d, args.layers))
    if d["problems"]:
        for p in d["problems"]:
            print(f"error: {p}", file=sys.stderr)
        return 1
    return 0
