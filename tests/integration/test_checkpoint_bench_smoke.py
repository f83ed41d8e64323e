"""``bench/checkpoint.py --smoke`` runs and its table says what the full benchmark claims."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_checkpoint_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_checkpoint", ROOT / "bench" / "checkpoint.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        text = bench.main(["--smoke", "--out", str(tmp_path / "table.md")])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "table.md").read_text().strip() == text.strip()
    ratios = {
        float(d): float(r)
        for d, r in re.findall(r"^\| ([\d.]+) \(targets [\d.]+\) .*?\*\*([\d.]+)\*\*", text, re.M)
    }
    assert set(ratios) == {0.1, 0.05}
    assert ratios[0.05] < ratios[0.1] <= 0.20  # sizes are deterministic: seeded masks, exact bytes
    row = re.search(
        r"^\| 1 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", text, re.M
    )
    local, largest, written, torch_peak, numpy_peak, ratio = map(float, row.groups())
    assert 0 < written < local and largest <= local
    assert ratio < 0.5 and torch_peak + numpy_peak <= largest  # one piece at a time, not the shard
    check = re.search(r"world 1: (\d+) -> ([\d.]+) / ([\d.]+)", text)
    assert abs(float(check[2]) - float(check[1])) < 1 and abs(float(check[3]) - float(check[1])) < 1


def test_run_checkpoint_bench_smoke():
    """``--run --smoke``: a 2-rank DDP run checkpoint under the three protocols; bytes are exact."""
    spec = importlib.util.spec_from_file_location("bench_checkpoint", ROOT / "bench" / "checkpoint.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        text = bench.main(["--run", "--smoke", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    rows = dict(re.findall(r"^\| 2 \| (\w+) \| [\d./ ]+ \| ([\d.]+) \|", text, re.M))
    assert set(rows) == {"0c40b65", "80801d0", "now"}
    total = {k: float(v) for k, v in rows.items()}
    assert total["now"] == total["80801d0"] < total["0c40b65"]  # the sparse state once, not per rank
