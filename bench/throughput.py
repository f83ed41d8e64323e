"""End-to-end training throughput: the sparse_sup training loop against a plain PyTorch loop (CPU).

What runs, per model, side by side in one process:

* ``plain``      -- a minimal training loop written here the way a user writes one: the decoded
                    uint8 training images in one tensor, a seeded permutation per epoch, pad-4
                    random crop + horizontal flip, normalisation, forward, cross-entropy, backward,
                    SGD (lr 0.1, momentum 0.9, wd 5e-4), ``loss.item()`` each step, a log line
                    every 20 steps;
* ``ss_dense``   -- ``python train.py`` as a user runs it, in-process: the real ``Run`` of
                    ``sparse_sup.train.loop`` (data sampler and keyed augmentation, Accelerate,
                    backend, engine, logging, metrics.jsonl) at density 1.0;
* ``ss_sparse``  -- the same at RigL density 0.1 (ERK).

All three build the same model from the same seed (``sparse_sup.models.build_model``), use the same
bundled CIFAR-10 training images, batch size, optimizer and one torch thread. Topology updates are
pushed beyond the measured steps (``sparse.update_interval`` very large) and evaluation is timed
separately: their cost is what ``bench/topology_cost.py`` and the eval column report.

Timing: the loops run in threads that hand a baton to each other, so exactly one runs at a time.
A loop's *window* is the wall time (and the CPU time of its thread: with one torch thread every op
runs in the calling thread, so this clock ignores other processes on a shared machine) from the
start of one step to the start of the step ``--steps`` later, which includes everything the loop
does between steps (logging, metrics, progress). After ``--warmup`` windows each, ``--rounds``
rounds give every loop one window, in rotating order; the tables show the median over rounds.
Evaluation of the 2k test images (``Run.evaluate`` vs a plain ``no_grad`` loop) is timed the same
way afterwards; "per step with eval" adds one evaluation per epoch (78 steps) to the step time.

``--profile`` runs cProfile over the sparse_sup sparse loop and the plain loop (top functions by own
time); ``--breakdown`` times each piece of work the sparse_sup step adds (CPU ms per call).

Usage: python bench/throughput.py [--models resnet32_cifar resnet18 vit_tiny] [--rounds 7]
       [--steps 4] [--batch 128] [--profile] [--smoke]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: every thread of this process uses one

import argparse  # noqa: E402
import cProfile  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_sup.config import load_config  # noqa: E402
from sparse_sup.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from sparse_sup.models import build_model  # noqa: E402

MODELS: dict[str, list[str]] = {  # config overrides of each model (on configs/debug-cpu.yaml)
    "resnet32_cifar": ["--model.name=resnet32_cifar", "--model.cifar_stem=false"],
    "resnet18": ["--model.name=resnet18", "--model.cifar_stem=false"],  # the default job's model
    "vit_tiny": ["--model.name=vit_tiny_patch16_224", "--model.kwargs={img_size: 32, patch_size: 8}"],
    "test_resnet": ["--model.name=test_resnet", "--model.cifar_stem=false"],  # --smoke
}
VARIANTS = ("plain", "ss_dense", "ss_sparse")
LR, MOMENTUM, WD, SEED = 0.1, 0.9, 5e-4, 0


class Stop(Exception):
    """Raised inside a loop's step hook when the benchmark is over."""


class Baton:
    """Exactly one loop runs at a time; ``schedule`` lists whose turn each window is."""

    def __init__(self, schedule: list[str]) -> None:
        self.schedule, self.position = schedule, 0
        self.cond = threading.Condition()
        self.times: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}  # CPU time of the loop's own thread
        self.errors: list[BaseException] = []

    @property
    def turn(self) -> str | None:
        return self.schedule[self.position] if self.position < len(self.schedule) else None

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn in (name, None) or self.errors)
            if self.turn is None or self.errors:
                raise Stop

    def done(self, name: str, seconds: float, cpu_seconds: float) -> None:
        with self.cond:
            self.times.setdefault(name, []).append(seconds)
            self.cpu.setdefault(name, []).append(cpu_seconds)
            self.position += 1
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cond:
            self.errors.append(error)
            self.cond.notify_all()


def step_hook(
    baton: Baton, name: str, steps: int, sync: Callable[[], None] | None = None
) -> Callable[[], None]:
    """Called at the start of every step of a loop: closes a window every ``steps`` steps. ``sync``
    (``torch.cuda.synchronize`` on a GPU) waits for the device before a window closes and before one
    starts: kernels run asynchronously, and a loop's queued work would otherwise be timed in the
    window of the loop that runs next."""
    state = {"n": 0, "start": 0.0, "cpu": 0.0}

    def hook() -> None:
        if state["n"] % steps == 0:
            if sync:
                sync()
            if state["n"]:
                baton.done(name, time.perf_counter() - state["start"], time.thread_time() - state["cpu"])
            baton.wait(name)
            if sync:
                sync()
            state["start"], state["cpu"] = time.perf_counter(), time.thread_time()
        state["n"] += 1

    return hook


# ----------------------------------------------------------------------------- the plain loop


class PlainLoop:
    """What a user writes without a framework (see the module docstring)."""

    def __init__(self, model_args: dict, images: torch.Tensor, labels: torch.Tensor, batch: int) -> None:
        torch.manual_seed(SEED)
        self.model = build_model(**model_args)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        self.images, self.labels, self.batch = images, labels, batch
        self.mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        self.gen = torch.Generator().manual_seed(SEED)
        self.log = logging.getLogger("plain")

    def batches(self):
        n, b = len(self.images), self.batch
        while True:
            perm = torch.randperm(n, generator=self.gen)
            for i in range(n // b):
                idx = perm[i * b : (i + 1) * b]
                x = F.pad(self.images[idx], (4, 4, 4, 4))
                tops = torch.randint(0, 9, (b,), generator=self.gen).tolist()
                lefts = torch.randint(0, 9, (b,), generator=self.gen).tolist()
                flips = torch.rand(b, generator=self.gen) < 0.5
                x = torch.stack(
                    [x[k, :, t : t + 32, s : s + 32] for k, (t, s) in enumerate(zip(tops, lefts))]
                )
                x = torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)
                yield (x.float() / 255 - self.mean) / self.std, self.labels[idx]

    def train(self, hook: Callable[[], None]) -> None:
        self.model.train()
        running, step = 0.0, 0
        for x, y in self.batches():
            hook()
            loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            running += loss.item()
            step += 1
            if step % 20 == 0:
                self.log.info("step %d loss %.4f", step, running / 20)
                running = 0.0

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
        self.model.eval()
        correct = 0
        for i in range(0, len(images), batch):
            x = (images[i : i + batch].float() / 255 - self.mean) / self.std
            correct += (self.model(x).argmax(1) == labels[i : i + batch]).sum().item()
        self.model.train()
        return correct / len(images)


# ----------------------------------------------------------------------------- sparse_sup


def sparse_sup_run(
    model: str | list[str], density: float, batch: int, out: Path, extra: list[str], gpu: bool = False
):
    """A started ``Run`` of the real training loop (what ``python train.py`` builds). ``model``: a key
    of ``MODELS`` or the model's config overrides. ``gpu``: the Accelerator ``python train.py`` makes
    (its device, ``train.precision``); else one CPU process, whatever the machine has."""
    from accelerate import Accelerator

    from sparse_sup.train.loop import Run
    from sparse_sup.train.run import make_accelerator
    from sparse_sup.train.setup import prepare

    try:
        from sparse_sup.train.progress import configure as configure_progress

        configure_progress(False)
    except ImportError:  # older trees: the bar follows train.progress_bar only
        pass
    config = load_config(
        str(ROOT / "configs" / "debug-cpu.yaml"),
        [
            *(MODELS[model] if isinstance(model, str) else model),
            f"--sparse.density={density}",
            "--sparse.method=rigl",
            "--sparse.update_interval=1000000",  # no topology update while timing (topology_cost.py)
            "--schedule.epochs=1000",  # no phase end or cycle while timing
            f"--schedule.batch_size={batch}",
            "--train.progress_bar=false",
            "--train.save_tickets=false",
            f"--experiment.output_dir={out}",
            "--experiment.overwrite=true",
            *extra,
        ],
    )
    run_ = Run(prepare(config), make_accelerator(config) if gpu else Accelerator(cpu=True))
    run_.start()
    return run_


def hook_run(run_, hook: Callable[[], None]) -> None:
    """Call ``hook`` at the start of every optimizer step of the real loop."""
    name = "optimizer_step" if hasattr(run_, "optimizer_step") else "_optimizer_step"  # older trees
    inner = getattr(run_, name)

    def hooked(*args, **kwargs):
        hook()
        return inner(*args, **kwargs)

    setattr(run_, name, hooked)


def train_hooked(run_) -> Callable[[Callable[[], None]], None]:
    """``run_.train`` as a loop that takes a step hook, like ``PlainLoop.train``."""
    return lambda hook: (hook_run(run_, hook), run_.train())


# ----------------------------------------------------------------------------- measuring


def rotating_schedule(names: list[str], warmup: int, rounds: int) -> list[str]:
    schedule = [n for _ in range(warmup) for n in names]
    for r in range(rounds):
        k = r % len(names)
        schedule += names[k:] + names[:k]
    return schedule


def time_loops(
    loops: dict[str, Callable[[Callable[[], None]], None]],
    warmup: int,
    rounds: int,
    steps: int,
    threads: int | None = None,
    sync: Callable[[], None] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and thread-CPU seconds per step of each loop (``loop(hook)`` trains until its hook
    raises ``Stop``): each runs in a thread of its own, one window at a time (module docstring).
    ``threads``: torch threads of each loop's thread; ``sync``: see ``step_hook``."""
    names = list(loops)
    baton = Baton(rotating_schedule(names, warmup, rounds))

    def target(name: str) -> None:
        if threads:
            torch.set_num_threads(threads)
        try:
            loops[name](step_hook(baton, name, steps, sync))
        except Stop:
            pass
        except BaseException as e:  # noqa: BLE001 (re-raised in the main thread)
            baton.fail(e)

    workers = [threading.Thread(target=target, args=(n,), daemon=True) for n in names]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if baton.errors:
        raise baton.errors[0]

    def per_step(times: dict[str, list[float]]) -> dict[str, float]:
        return {n: statistics.median(ts[warmup:]) / steps for n, ts in times.items()}

    return per_step(baton.times), per_step(baton.cpu)


def measure(model: str, args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, float]]:
    """Median seconds per step (training) and per evaluation of every variant."""
    runs = {
        "ss_dense": sparse_sup_run(model, 1.0, args.batch, tmp / f"{model}-dense", args.extra),
        "ss_sparse": sparse_sup_run(model, 0.1, args.batch, tmp / f"{model}-sparse", args.extra),
    }
    train_set = runs["ss_sparse"].p.train_set
    eval_set = runs["ss_sparse"].p.eval_set
    logging.getLogger("sparse_sup").setLevel(logging.WARNING)  # same log volume as the plain loop
    model_args = {
        "name": runs["ss_sparse"].config.model.name,
        "num_classes": runs["ss_sparse"].config.model.num_classes or 10,
        "kwargs": runs["ss_sparse"].config.model.kwargs,
    }
    plain = PlainLoop(model_args, train_set.images, train_set.labels, args.batch)
    names = list(VARIANTS)
    loops = {"plain": plain.train, **{n: train_hooked(r) for n, r in runs.items()}}
    step, cpu = time_loops(loops, args.warmup, args.rounds, args.steps, args.threads)

    evals: dict[str, list[float]] = {n: [] for n in names}
    evals_cpu: dict[str, list[float]] = {n: [] for n in names}
    eval_images = eval_set.images
    eval_labels = eval_set.labels
    for r in range(max(1, args.rounds // 2)):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0, c0 = time.perf_counter(), time.thread_time()
            if n == "plain":
                plain.evaluate(eval_images, eval_labels)
            else:
                runs[n].recorder.evaluate()
            evals[n].append(time.perf_counter() - t0)
            evals_cpu[n].append(time.thread_time() - c0)
    steps_per_epoch = len(train_set) // args.batch
    out = {}
    for n in names:
        e, ec = statistics.median(evals[n]), statistics.median(evals_cpu[n])
        out[n] = {
            "step": step[n],
            "eval": e,
            "with_eval": step[n] + e / steps_per_epoch,
            "cpu_step": cpu[n],
            "cpu_eval": ec,
            "cpu_with_eval": cpu[n] + ec / steps_per_epoch,
        }
    return out


def _pieces(run_, batch: int) -> tuple[torch.optim.Optimizer, dict[str, Callable[[], object]]]:
    """The optimizer and the per-step pieces of work of a started ``Run`` (after one backward)."""
    engine, opt = run_.engine, run_.backend._step.optimizer
    keys = [(0, i) for i in range(batch)]
    images, labels = run_.p.train_set.get_batch(keys)
    F.cross_entropy(run_.model(images), labels).backward()
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    return opt, {
        "data: keys + get_batch (crop, flip, normalise)": lambda: run_.p.train_set.get_batch(keys),
        "engine.lr + phase (LR of the step, progress)": lambda: (engine.lr(), engine.phase()),
        "masks on gradients (before the step)": lambda: engine.masks.apply_to_grads(engine.targets),
        "non-finite check (foreach_norm)": lambda: run_.backend._step._grads_finite(params),
        "masks on weights + momentum (after the step)": lambda: engine.masks.apply(engine.targets),
        "density for the log line": lambda: engine.masks.density(engine.targets),
        "SGD step (both loops)": opt.step,
    }


def breakdown(model: str, args: argparse.Namespace, tmp: Path) -> None:
    """CPU milliseconds of each piece of work the sparse_sup step adds to a plain step, per step."""
    print(f"\n### Per-step work sparse_sup adds, {model} (CPU ms of one call, median of {args.reps})\n")
    print("| piece | density 1.0 | RigL density 0.1 |\n|---|---|---|")
    results: dict[str, dict[float, float]] = {}
    for density in (1.0, 0.1):
        run_ = sparse_sup_run(model, density, args.batch, tmp / f"{model}-bd-{density}", args.extra)
        logging.getLogger("sparse_sup").setLevel(logging.WARNING)
        opt, pieces = _pieces(run_, args.batch)
        for name, fn in pieces.items():
            times = []
            for _ in range(args.reps):
                c0 = time.thread_time()
                fn()
                times.append(time.thread_time() - c0)
            results.setdefault(name, {})[density] = 1e3 * statistics.median(times)
    for name, r in results.items():
        print(f"| {name} | {r[1.0]:.2f} | {r[0.1]:.2f} |")


def profile(model: str, args: argparse.Namespace, tmp: Path) -> None:
    """cProfile of ``--steps * --rounds`` steps of the sparse loop and of the plain loop."""
    run_ = sparse_sup_run(model, 0.1, args.batch, tmp / f"{model}-profile", args.extra)
    logging.getLogger("sparse_sup").setLevel(logging.WARNING)
    train_set = run_.p.train_set
    plain = PlainLoop(
        {"name": run_.config.model.name, "num_classes": 10, "kwargs": run_.config.model.kwargs},
        train_set.images,
        train_set.labels,
        args.batch,
    )
    n = args.steps * args.rounds
    for name, start in (("ss_sparse", train_hooked(run_)), ("plain", plain.train)):
        count = {"n": 0}

        def hook(count=count):
            count["n"] += 1
            if count["n"] > n + 2:
                raise Stop

        prof = cProfile.Profile()
        prof.enable()
        try:
            start(hook)
        except Stop:
            pass
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(f"\n### cProfile, {name}, {model}, {n + 2} steps (sorted by own time)\n```")
        print(text.getvalue().split("\n", 4)[-1].strip())
        print("```")


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=["resnet32_cifar", "resnet18", "vit_tiny"]
    )
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="steps per window")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="CPU ms of each piece sparse_sup adds")
    ap.add_argument("--reps", type=int, default=20, help="calls per piece for --breakdown")
    ap.add_argument("--extra", nargs="*", default=[], help="more config overrides for the sparse_sup runs")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on timm's test_resnet")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.rounds, args.steps, args.batch = ["test_resnet"], 2, 2, 32
        args.extra = [*args.extra, "--data.max_train_samples=256", "--data.max_eval_samples=64"]
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    print(
        f"# bench/throughput.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, {args.rounds} rounds x "
        f"{args.steps} steps (median over rounds), {load_line()} at start"
        + (f", sparse_sup overrides {' '.join(args.extra)}" if args.extra else "")
        + "\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile or args.breakdown:
            for model in args.models:
                (profile if args.profile else breakdown)(model, args, Path(tmp))
            return
        rows = []
        for model in args.models:
            rows.append((model, measure(model, args, Path(tmp))))
            print(f"measured {model}, {load_line()}", flush=True)
        for clock, key in (("CPU time of the loop's thread", "cpu_"), ("wall time", "")):
            print(
                f"\n**{clock}** per optimizer step (median over rounds)\n\n"
                "| model | plain s/step | sparse_sup dense s/step | ratio | sparse_sup RigL 0.1 s/step "
                "| ratio "
                "| eval s (plain / dense / sparse) | ratio per step with 1 eval/epoch (dense / sparse) |\n"
                "|---|---|---|---|---|---|---|---|"
            )
            for model, t in rows:
                p, d, s_ = t["plain"], t["ss_dense"], t["ss_sparse"]
                print(
                    f"| {model} | {p[key + 'step']:.3f} | {d[key + 'step']:.3f} | "
                    f"{d[key + 'step'] / p[key + 'step']:.3f} | {s_[key + 'step']:.3f} | "
                    f"{s_[key + 'step'] / p[key + 'step']:.3f} | {p[key + 'eval']:.2f} / "
                    f"{d[key + 'eval']:.2f} / "
                    f"{s_[key + 'eval']:.2f} | {d[key + 'with_eval'] / p[key + 'with_eval']:.3f} / "
                    f"{s_[key + 'with_eval'] / p[key + 'with_eval']:.3f} |"
                )
    print(f"\n{load_line()} at the end")


if __name__ == "__main__":
    main()
