"""``selfprompt bench``: tasks x methods x backbones x seeds (x initializers x prompt lengths) on a registered
benchmark (``selfprompt data list``), each cell a ``selfprompt train`` run of a recipe; resumable, with tables
and a plot.

A benchmark names its recipe folder (:class:`selfprompt.data.registry.Benchmark`): either
``<recipes>/<backbone>/<method>.yaml``, where a backbone is a recipe folder (``mae``, ``moco``,
``sup_in21k``: the repository's VTAB-1k and FGVC recipe folders), or one recipe per method run with any
timm backbone (VTAB-mini: the package's recipes with the zoo backbones).

A cell with a ``cell.json`` is never run again; one that stopped part-way resumes from its checkpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from selfprompt.apps.report import write_report
from selfprompt.apps.stats import paired_difference
from selfprompt.apps.sweep import RECORD_NAME
from selfprompt.atomic import read_json, write_json
from selfprompt.config import MethodName
from selfprompt.data import registry
from selfprompt.data.vtab_mini import RECIPES as RECIPES  # the package's recipes, re-exported
from selfprompt.engine.rundir import RunDir
from selfprompt.methods import get_method, method_names
from selfprompt.zoo.models import ZOO_TAGS

CELL_NAME = "cell.json"
LOG_NAME = "cell.log"


def zoo_pool(backbone: str) -> str:
    """The pooling a zoo backbone was pretrained for: patch-token mean for MAE, class token otherwise."""
    return "avg" if ".mae" in backbone else "token"


@dataclass
class BenchConfig:
    """The grid and how to run it.

    Attributes:
        root: The benchmark's folder (written by `selfprompt data prepare`; one folder per task).
        benchmark: A registered benchmark (``selfprompt data list``).
        output_dir: Where cells, tables and the plot go; rerunning continues what is there.
        tasks: Tasks; None runs every task found in root.
        methods: Methods, each trained with its recipe (default: every registered method).
        backbones: Recipe folders where the benchmark's recipes are per backbone (default: all of them, e.g.
            mae, moco, sup_in21k), else timm names (default: both zoo backbones).
        recipes: The folder of the benchmark's recipes (default: its own, e.g. recipes/vtab under the
            current folder; VTAB-mini: the package's).
        overrides: Extra `--section.field value` arguments for every cell, e.g. ["--model.checkpoint", "P"].
        seeds: Seeds of every cell.
        inits: Sweep the prompt initializer over these (methods that take any initializer, e.g. spt-*);
            None keeps the recipe's.
        num_prompts: Sweep the prompt length over these (methods with prompts); None keeps the recipe's.
        keep: Shares of the prompts kept by the methods that condense another method's run (pc: its
            ``vpt-deep`` cell, trained first and condensed by ``selfprompt condense``), one cell each.
        epochs: Training epochs of every cell; None keeps the recipes' (10).
        stage: final (train on train800val200 with the recipe's fixed settings, test once) or both
            (also the tune stage: train800 -> val200 curves).
        workers: Cells run at once, each its own process.
        threads: CPU threads per cell; None splits the machine's cores over the workers.
        device: auto, cpu, cuda or cuda:N, for every cell.
        num_workers: Data-loading worker processes per cell; None keeps the recipes' (2).
        stop_after_minutes: Start no new cell after this long (finished cells are kept; rerun to go on).
        launcher: Where cells run: local (a process per cell on this machine), slurm (a SLURM job per cell,
            through submitit; ``workers`` jobs at once) or submitit (submitit's local executor: the slurm code
            path on this machine, for checking a setup).
        slurm: submitit/SLURM parameters for every job, e.g. {"slurm_partition": "gpu", "gpus_per_node": 1,
            "timeout_min": 60} (see submitit's ``update_parameters``).
        compare: Two variants A B: print their paired difference (mean, bootstrap 95% interval, wins) over
            the cells both ran, per backbone.
        search: The protocol's search in every cell (``selfprompt sweep``: each setting's tune stage on
            train -> val, the best by validation accuracy retrained on train+val and tested once): a grid
            such as {"optim.lr": [0.05, 0.01]} for every method, a grid per method ({"full": {"optim.lr":
            [1e-3, 1e-4]}, "vpt-deep": {...}}), or "default" for each method's own grid
            (``selfprompt.methods``, tagged with its source); None trains each recipe's fixed settings.
        search_seeds: With a search, ``each`` seed searches for itself; ``first`` searches with the first seed
            only, and the other seeds train the setting it chose (VPT's protocol: one search per task, then
            the seeds), which saves a tune training per grid point and seed.
    """

    root: str
    benchmark: str = "vtab-mini"
    output_dir: str = "runs/bench"
    tasks: list[str] | None = None
    methods: list[MethodName] = field(default_factory=method_names)
    backbones: list[str] | None = None
    recipes: str | None = None
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    inits: list[str] | None = None
    num_prompts: list[int] | None = None
    keep: list[float] = field(default_factory=lambda: [0.3])
    epochs: int | None = None
    stage: Literal["final", "both"] = "final"
    workers: int = 1
    threads: int | None = None
    device: str = "auto"
    num_workers: int | None = None
    stop_after_minutes: float | None = None
    compare: list[str] | None = None
    launcher: Literal["local", "submitit", "slurm"] = "local"
    slurm: dict[str, Any] = field(default_factory=dict)
    search: dict[str, list[Any] | dict[str, list[Any]]] | Literal["default"] | None = None
    search_seeds: Literal["each", "first"] = "each"


@dataclass(frozen=True)
class Cell:
    backbone: str
    task: str
    method: str
    seed: int
    init: str | None = None
    num_prompts: int | None = None
    keep: float | None = None

    @property
    def variant(self) -> str:
        """The method plus the swept settings, e.g. ``spt-deep[mean_pool,M=5]`` or ``pc[keep=0.3]``."""
        settings = (
            self.init,
            None if self.num_prompts is None else f"M={self.num_prompts}",
            None if self.keep is None else f"keep={self.keep:g}",
        )
        extra = [x for x in settings if x]
        return f"{self.method}[{','.join(extra)}]" if extra else self.method

    def directory(self, out: Path) -> Path:
        return out / "cells" / self.backbone / self.task / self.variant / f"seed{self.seed}"

    @property
    def source(self) -> Cell | None:
        """The cell whose trained run this one condenses (pc), else None."""
        condenses = get_method(self.method).condenses
        return Cell(self.backbone, self.task, condenses, self.seed) if condenses else None


def cell_search(cfg: BenchConfig, cell: Cell) -> dict[str, list[Any]] | None:
    """The grid a cell searches, or None when it trains its recipe's fixed settings."""
    if cfg.search == "default":
        return get_method(cell.method).search.grid
    if cfg.search is not None and cell.method in cfg.search:
        return cfg.search[cell.method]
    return cfg.search


def searched_by(cfg: BenchConfig, cell: Cell) -> Cell | None:
    """The cell whose search chose this one's settings when it trains them without searching, else None."""
    if cell_search(cfg, cell) is None or cfg.search_seeds == "each" or cell.seed == cfg.seeds[0]:
        return None
    return replace(cell, seed=cfg.seeds[0])


def searched_best(cfg: BenchConfig, cell: Cell, out: Path) -> dict[str, Any]:
    """The best setting (``params``, ``val_acc``) of the search whose choice ``cell`` trained: its own
    ``sweep.json``, or its first seed's under ``--search_seeds first``."""
    return read_json((searched_by(cfg, cell) or cell).directory(out) / RECORD_NAME)["best"]


def backbones(cfg: BenchConfig) -> list[str]:
    if cfg.backbones is not None:
        return cfg.backbones
    return list(registry.benchmark(cfg.benchmark).recipe_backbones or ZOO_TAGS)


def recipe(cfg: BenchConfig, cell: Cell) -> Path:
    benchmark = registry.benchmark(cfg.benchmark)
    name = f"{cell.method.replace('-', '_')}.yaml"
    if not benchmark.recipe_backbones:
        return Path(benchmark.recipes) / name
    return Path(cfg.recipes or benchmark.recipes) / cell.backbone / name


def grid(cfg: BenchConfig) -> list[Cell]:
    """Every cell, seed-major (all of seed 0 first), so a stopped bench has whole seeds."""
    root = Path(cfg.root)
    known = registry.tasks(cfg.benchmark)
    last_split = {name: t.splits[-1] for name, t in known.items()}
    prepared = [n for n, t in known.items() if (root / t.folder / f"{last_split[n]}.txt").is_file()]
    tasks = cfg.tasks if cfg.tasks is not None else prepared
    missing = [t for t in tasks if t not in prepared]
    if missing or not tasks:
        raise FileNotFoundError(
            f"{cfg.benchmark} tasks {missing or list(known)} are not prepared in {root}: run selfprompt data "
            f"prepare {cfg.benchmark} (see selfprompt data list for the folder each task needs)."
        )
    unknown = [m for m in cfg.methods if m not in method_names()]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; methods: {method_names()}.")
    condensing = [m for m in cfg.methods if get_method(m).condenses]
    if condensing and cfg.stage != "final":
        raise ValueError(
            f"{condensing} condense their source's final-stage model, trained on train+val: a tune stage "
            "would score on images it trained on. Run them with --stage final."
        )
    if cfg.search is not None:
        if condensing:
            raise ValueError(
                f"{condensing} with --search: their tune trials would need a source trained on train only; "
                "run them without --search."
            )
        if cfg.search == "default":
            ungridded = [m for m in cfg.methods if get_method(m).search is None]
            if ungridded:
                raise ValueError(f"{ungridded} have no default grid; pass --search as a grid for them.")
        elif any(key in method_names() for key in cfg.search):
            ungridded = [m for m in cfg.methods if m not in cfg.search]
            if ungridded or not all(isinstance(v, dict) for v in cfg.search.values()):
                raise ValueError(
                    f"--search gives grids per method: give one (a mapping of fields to values) for each of "
                    f"{cfg.methods}; missing: {ungridded}."
                )
    cells = []
    for seed, backbone, task, name in itertools.product(cfg.seeds, backbones(cfg), tasks, cfg.methods):
        method = get_method(name)
        inits = cfg.inits if cfg.inits and method.has_prompts and method.inits is None else [None]
        lengths = cfg.num_prompts if cfg.num_prompts and method.has_prompts else [None]
        keeps = cfg.keep if method.condenses else [None]
        cells += [Cell(backbone, task, name, seed, i, m, k) for i in inits for m in lengths for k in keeps]
    sources = [c.source for c in cells if c.source is not None]
    cells = list(dict.fromkeys([*cells, *sources]))  # a condensed cell's source runs even if not asked for
    absent = sorted({str(recipe(cfg, c)) for c in cells if not recipe(cfg, c).is_file()})
    if absent:
        raise FileNotFoundError(
            f"Recipes {absent} do not exist; pass --recipes DIR holding <backbone>/<method>.yaml (the "
            f"repository's {registry.benchmark(cfg.benchmark).recipes}) and backbones that are its folders."
        )
    return cells


def cell_commands(cfg: BenchConfig, cell: Cell, out: Path, resume: bool) -> list[list[str]]:
    """The commands of one cell: its ``selfprompt train`` (``sweep`` with a search), after ``selfprompt
    condense`` of its source's run for a method that condenses one."""
    train = train_command(cfg, cell, out, resume)
    search = cell_search(cfg, cell)
    if searched_by(cfg, cell) is not None:
        chosen = searched_best(cfg, cell, out)["params"]
        settings = [
            a for k, v in chosen.items() for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))
        ]
        return [[*train, *settings]]
    if search is not None:  # the sweep resumes its trials itself
        return [[*train[:3], "sweep", *train[4:], "--search", json.dumps(search)]]
    if cell.source is None:
        return [train]
    condensed = cell.directory(out) / "condensed"
    condense = [
        sys.executable, "-m", "selfprompt", "condense", str(cell.source.directory(out)),
        "--keep", str(cell.keep), "--seed", str(cell.seed), "--device", cfg.device,
        "--output", str(condensed),
    ]  # fmt: skip
    return [condense, [*train, "--condense.adapter", str(condensed)]]


def train_command(cfg: BenchConfig, cell: Cell, out: Path, resume: bool) -> list[str]:
    if registry.benchmark(cfg.benchmark).recipe_backbones:
        data = []  # the recipe is the backbone's
    else:
        data = ["--model.backbone", cell.backbone, "--model.pool", zoo_pool(cell.backbone)]
    args = [
        sys.executable, "-m", "selfprompt", "train", str(recipe(cfg, cell)), *data,
        "--data.root", str(cfg.root),
        "--data.benchmark", cfg.benchmark,
        "--data.task", cell.task,
        "--seeds", f"[{cell.seed}]",
        "--stage", cfg.stage,
        "--device", cfg.device,
        "--output_dir", str(cell.directory(out)),
        "--progress", "false",
    ]  # fmt: skip
    if cfg.epochs is not None:
        args += ["--optim.epochs", str(cfg.epochs), "--optim.warmup_epochs", str(max(1, cfg.epochs // 10))]
    if cfg.num_workers is not None:
        args += ["--data.num_workers", str(cfg.num_workers)]
    if cell.init is not None:
        args += ["--prompt.init", cell.init]
    if cell.num_prompts is not None:
        args += ["--prompt.num_prompts", str(cell.num_prompts)]
    return args + list(cfg.overrides) + (["--resume", "true"] if resume else [])


def run_cell(cfg: BenchConfig, cell: Cell, out: Path, threads: int) -> dict[str, Any]:
    """Train one cell in its own process and write its record, ``cell.json``."""
    directory = cell.directory(out)
    run = RunDir(directory)
    record_path = directory / CELL_NAME
    resume = run.is_run()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.perf_counter()
    for command in cell_commands(cfg, cell, out, resume):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / LOG_NAME).open("a") as log:  # every attempt's output, kept beside its config.yaml
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(
                f"cell {directory} failed (exit {done.returncode}); see {directory / LOG_NAME}"
            )
    search, searcher = cell_search(cfg, cell), searched_by(cfg, cell)
    chosen = searched_best(cfg, cell, out) if search is not None else None
    if search is not None and searcher is None:  # the sweep's retrained run
        run = RunDir(directory / "final")
    results, env_info = run.read_results(), run.read_env()
    final = next(r for r in results if r.stage == "final")
    tune = next((r for r in results if r.stage == "tune"), None)
    record = asdict(cell) | {
        "variant": cell.variant,
        "group": registry.task(cfg.benchmark, cell.task).group,
        "test_acc": final.last_acc,
        "val_acc": chosen["val_acc"] if search is not None else tune.last_acc if tune else None,
        "search": search,
        "chosen": chosen["params"] if search is not None else None,
        "searched_seed": None if search is None else cell.seed if searcher is None else searcher.seed,
        "trainable_parameters": final.trainable_parameters,
        "trainable_share": final.trainable_share,
        "epochs": final.epochs,
        "seconds": time.perf_counter() - started,
        "device": env_info.get("device_name") or env_info["device"],
        "resumed": resume,
    }
    write_json(record_path, record)
    return record


def launcher(cfg: BenchConfig, out: Path) -> Callable[..., dict[str, Any]]:
    """``launch(fn, *args)``: runs ``fn(*args)`` here (local) or as a submitit job (slurm, submitit) and
    returns its result; a job's logs go to ``<output_dir>/jobs/``."""
    if cfg.launcher == "local":
        return lambda fn, *args: fn(*args)
    import submitit  # the `sweep` extra

    cluster = "slurm" if cfg.launcher == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=out / "jobs" / "%j", cluster=cluster)
    executor.update_parameters(**cfg.slurm)
    return lambda fn, *args: executor.submit(fn, *args).result()


def bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the grid's unfinished cells, then write ``results.{md,csv}``, ``cells.csv`` and ``results.png``."""
    if cfg.compare is not None and len(cfg.compare) != 2:
        raise ValueError(f"--compare takes two variants, A and B, got {cfg.compare}.")
    cells = grid(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers)
    deadline = None if cfg.stop_after_minutes is None else time.monotonic() + 60 * cfg.stop_after_minutes
    log(f"bench: {len(cells)} cells, {cfg.workers} at a time with {threads} thread(s) each -> {out}")
    records: dict[Cell, dict[str, Any]] = {}
    lock, started = threading.Lock(), time.monotonic()

    def work(cell: Cell) -> None:
        if (
            deadline is not None
            and time.monotonic() > deadline
            and not (cell.directory(out) / CELL_NAME).is_file()
        ):
            return
        done = cell.directory(out) / CELL_NAME  # a finished cell is read, never run (nor queued) again
        record = json.loads(done.read_text()) if done.is_file() else launch(run_cell, cfg, cell, out, threads)
        search, searcher = cell_search(cfg, cell), searched_by(cfg, cell)
        asked = (search, None if search is None else (searcher or cell).seed)
        ran = (record.get("search"), record.get("searched_seed", None if search is None else cell.seed))
        if ran != asked:
            raise ValueError(
                f"{done} was run with search {ran[0]} (on seed {ran[1]}), this bench asks for {asked[0]} (on "
                f"seed {asked[1]}): use another --output_dir for another protocol."
            )
        with lock:
            records[cell] = record
            elapsed = (time.monotonic() - started) / 60
            log(
                f"[{len(records)}/{len(cells)} {elapsed:.1f} min] {cell.backbone} {cell.task} {cell.variant} "
                f"seed {cell.seed}: test {100 * record['test_acc']:.2f}% ({record['seconds']:.0f} s)"
            )

    launch = launcher(cfg, out)
    waits = {c: c.source is not None or searched_by(cfg, c) is not None for c in cells}
    for phase in ([c for c in cells if not waits[c]], [c for c in cells if waits[c]]):
        # sources finish before the cells that condense them, searches before the seeds that reuse them
        with ThreadPoolExecutor(cfg.workers) as pool:
            for future in [pool.submit(work, cell) for cell in phase]:
                future.result()
    rows = [records[c] for c in cells if c in records]
    if len(rows) < len(cells):
        log(
            f"bench: stopped after {cfg.stop_after_minutes} min with {len(rows)}/{len(cells)} cells; "
            "rerun the same command to go on."
        )
    for path in write_report(rows, out, cfg, cfg.benchmark):
        log(f"bench: wrote {path}")
    if cfg.compare:
        for backbone in dict.fromkeys(r["backbone"] for r in rows):
            mine = [r for r in rows if r["backbone"] == backbone]
            log(f"bench: {backbone}: {paired_difference(mine, *cfg.compare).describe()}")
    return rows
