"""The figure registry behind ``diffsteer figures``: it registers, orders, runs, re-draws and writes figures.

It lives in ``theory`` (the bottom layer) so that ``sims`` and ``imaging`` can both register figures without
importing each other; it imports neither of them. Which modules hold figures is said by the caller
(the ``diffsteer`` command line gathers the lists of ``sims`` and ``imaging``).

A figure is registered in one of two forms:

- ``@figure(name, description, draw=draw_fn)`` on ``fn(quick) -> dict``: ``fn`` runs the experiment
  (full settings by default, reduced ones with ``quick``) and returns the numbers; ``draw_fn(data)``
  draws a matplotlib Figure from those numbers *as stored in the JSON* (plain lists / dicts / strings,
  non-finite floats as the strings "nan" / "inf"). Such a figure can be re-drawn from its JSON alone
  (``replot``), with no computation.
- ``@figure(name, description)`` on ``fn(quick) -> (Figure, dict)`` (draws while computing; no re-draw).

Each figure is written as ``<name>.png`` and ``<name>.json``; the JSON holds the numbers, the settings
(``quick``), the wall time of the computation and the figure's code version (``code_hash``).

A figure's output is *current* when both files exist and the JSON records the same settings (``quick``)
and the same code version. The code version is the SHA-256 of the source of the figure's module and
of every first-party module it imports, transitively (``theory``, ``sims``, ``imaging``, found from the
import statements without running them); a change to any of those files makes the figure stale, a change
elsewhere (another experiment, the docs, an installed library's version) does not. The runner itself
(``RUNNER_MODULES``: this registry and the progress reporting) is left out: it schedules, times and writes
figures but computes none of their numbers, so a change to it leaves every figure current.

Long experiments report their progress inside a figure through :func:`theory.progress.report`.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from .io import atomic_write_bytes, atomic_write_json, check_writable

__all__ = ["FigureSpec", "FIGURES", "figure", "load", "ordered_names", "to_jsonable", "code_hash", "is_current",
           "recorded_wall_time", "check_writable", "run_figures", "replot_figures", "FIRST_PARTY", "check_verdicts",
           "verdict_word", "VERDICT_KEYS", "VERDICT_WORDS", "prerequisite", "needs", "PREREQUISITES", "NEEDS"]

#: top-level packages whose source counts towards a figure's code version.
FIRST_PARTY = ("theory", "sims", "imaging")


@dataclass(frozen=True)
class FigureSpec:
    name: str
    fn: Callable
    description: str
    module: str
    draw: Optional[Callable] = None  # draw(json data) -> Figure; None: fn draws while computing
    verdicts: Optional[Callable] = None  # verdicts(json data) -> list of verdict dicts (see check_verdicts)


FIGURES: dict[str, FigureSpec] = {}


@dataclass(frozen=True)
class Prerequisite:
    """Something several figure modules need built first (a pre-trained pipeline in the cache): ``ready()``
    says whether it is there, ``build()`` builds it (safe to call from concurrent processes: the builder
    serialises them), ``cost_s`` is its build time for the schedule's estimate."""
    name: str
    ready: Callable[[], bool]
    build: Callable[[], object]
    cost_s: float


PREREQUISITES: dict[str, Prerequisite] = {}
#: module -> names of the prerequisites its figures need.
NEEDS: dict[str, tuple[str, ...]] = {}


def prerequisite(name: str, ready: Callable[[], bool], build: Callable[[], object], cost_s: float) -> None:
    """Register a prerequisite (see :class:`Prerequisite`)."""
    PREREQUISITES[name] = Prerequisite(name, ready, build, float(cost_s))


def needs(module: str, *names: str) -> None:
    """Declare that the figures of ``module`` need the registered prerequisites ``names``. With several
    worker processes, a missing prerequisite is built first in one worker while the others run the figures
    that do not need it; with one process the figure builds it when it first asks for it."""
    unknown = [n for n in names if n not in PREREQUISITES]
    if unknown:
        raise ValueError(f"needs: unknown prerequisite(s) {unknown}; registered: {sorted(PREREQUISITES)}")
    NEEDS[module] = tuple(dict.fromkeys(NEEDS.get(module, ()) + names))


#: the keys of one verdict, and the words a verdict starts with.
VERDICT_KEYS = ("claim", "verdict", "numbers", "regime", "budget")
VERDICT_WORDS = ("holds only when", "does not hold", "not resolved", "holds")


def verdict_word(verdict: str) -> str:
    """The leading verdict word of a verdict string: "holds", "does not hold", "holds only when" or "not
    resolved" (``theory.verdicts.UNRESOLVED``: neither the claim nor its opposite beyond 2 se)."""
    for w in VERDICT_WORDS:
        if verdict.startswith(w):
            return w
    raise ValueError(f"verdict: {verdict!r} must start with one of {VERDICT_WORDS}")


def check_verdicts(name: str, verdicts) -> list[dict]:
    """Validate what a figure's ``verdicts`` function returned: a list of dicts, each with the string keys
    ``claim`` (the paper's claim), ``verdict`` (starting with "holds", "does not hold", "holds only
    when" or "not resolved"), ``numbers`` (the measured numbers with their uncertainty), ``regime`` and ``budget``."""
    if not isinstance(verdicts, (list, tuple)):
        raise ValueError(f"verdicts: figure {name!r} must return a list of dicts, got {type(verdicts).__name__}")
    out = []
    for v in verdicts:
        missing = [k for k in VERDICT_KEYS if not isinstance(v, dict) or not isinstance(v.get(k), str)]
        if missing:
            raise ValueError(f"verdicts: figure {name!r} returned a verdict without the string field(s) {missing}: "
                             f"{v!r}")
        verdict_word(v["verdict"])
        out.append({k: v[k] for k in VERDICT_KEYS} | {k: v[k] for k in v if k not in VERDICT_KEYS})
    return out


def figure(name: str, description: str, draw: Optional[Callable] = None, verdicts: Optional[Callable] = None):
    """Decorator registering a figure under ``name`` (see the module docstring for the two forms).

    ``verdicts(data) -> list[dict]`` (optional) states the figure's verdicts on the papers' claims from its
    numbers as stored in the JSON (see :func:`check_verdicts` for the fields); they are written as the
    top-level ``verdicts`` of the figure's JSON and recomputed by ``replot``."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"name: figure names are file stems (letters, digits, '_', '-'), got {name!r}")

    def deco(fn):
        if name in FIGURES and FIGURES[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"name: figure {name!r} is registered twice ({FIGURES[name].module}, {fn.__module__})")
        FIGURES[name] = FigureSpec(name, fn, description, fn.__module__, draw, verdicts)
        return fn

    return deco


def load(modules: Iterable[str]) -> dict[str, str]:
    """Import every figure module; returns {module: why it is not loaded} for those that could not be
    imported because they, or a package they need, are not installed (e.g. an optional extra). The caller
    reports them; nothing is skipped silently. Any other error in a module propagates."""
    missing = {}
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            missing[mod] = f"needs the module {e.name!r}, which is not installed" if e.name else str(e)
    return missing


def ordered_names(modules: Sequence[str]) -> list[str]:
    """Every registered figure in drawing order: by its module's place in ``modules``, then in registration
    order within the module (independent of the order in which modules were imported). Loads ``modules``."""
    load(modules)
    rank = {m: i for i, m in enumerate(modules)}
    names = list(FIGURES)
    return sorted(names, key=lambda n: (rank.get(FIGURES[n].module, len(rank)), names.index(n)))


def to_jsonable(obj):
    """numpy / torch / dataclass values -> plain JSON types (NaN and inf become strings)."""
    import dataclasses

    import numpy as np

    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if torch is not None and isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().numpy())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else str(v)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --- code version ---------------------------------------------------------------------------------------

def _module_file(name: str) -> Optional[Path]:
    """The source file of a first-party module (None for other modules and for names that are not modules)."""
    if name.split(".")[0] not in FIRST_PARTY:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imported_modules(path: Path, module: str) -> set[str]:
    """Module names that the import statements of ``path`` (module ``module``) may refer to: ``import a.b``
    gives a.b; ``from a import b`` gives a and a.b (b may be a submodule); relative imports are resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    parts = module.split(".") if is_pkg else module.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base:
                out.add(base)
            out.update(f"{base}.{a.name}" if base else a.name for a in node.names)
    return out


def code_hash(module: str) -> str:
    """SHA-256 (16 hex digits) of the source of ``module`` and of the first-party modules it imports,
    transitively (see the module docstring)."""
    return _code_hash(module)


_HASHES: dict[str, str] = {}

#: modules every figure imports that compute none of its numbers (scheduling, timing, writing, progress):
#: left out of the code version, so that a change to the runner does not mark every figure stale
RUNNER_MODULES = ("theory.registry", "theory.progress")


def _code_hash(module: str) -> str:
    if module in _HASHES:
        return _HASHES[module]
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name in RUNNER_MODULES:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_imported_modules(path, name))
        # a submodule runs its packages' __init__ first
        for i in range(1, name.count(".") + 1):
            todo.append(name.rsplit(".", i)[0])
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(name.encode() + b"\0" + seen[name].read_bytes() + b"\0")
    _HASHES[module] = h.hexdigest()[:16]
    return _HASHES[module]


# --- output folder, current outputs, recorded costs -------------------------------------------------------

def _read_record(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_current(name: str, out: Path, quick: bool) -> bool:
    """Whether ``out`` holds ``name``'s PNG and JSON for these settings and this code version."""
    out = Path(out)
    rec = _read_record(out / f"{name}.json")
    return (rec is not None and (out / f"{name}.png").exists() and rec.get("quick") == quick
            and rec.get("code_hash") == code_hash(FIGURES[name].module))


def recorded_wall_time(name: str, quick: bool, folders: Sequence[Path]) -> Optional[float]:
    """The wall time recorded in the first of ``folders`` holding ``name``'s JSON at these settings."""
    for folder in folders:
        rec = _read_record(Path(folder) / f"{name}.json")
        if rec is not None and rec.get("quick") == quick and isinstance(rec.get("wall_time_s"), (int, float)):
            return float(rec["wall_time_s"])
    return None


# --- running -----------------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _agg():
    import matplotlib

    matplotlib.use("Agg")


def _fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "unknown"
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


class _Inner:
    """The progress listener of one figure: one bar per reported ``what`` (tqdm, on stderr); or, with
    ``lines`` (a log function, as in worker processes, whose bars would interleave), a line per ``what`` at
    most every ``LINE_EVERY_S`` seconds and at its end, with the time left at the rate so far."""

    def __init__(self, enabled: bool, name: str = "", lines: Optional[Callable[[str], None]] = None):
        self.enabled, self.bars, self.name, self.lines, self.seen = enabled, {}, name, lines, {}

    def __call__(self, done, total, unit, what):
        if self.lines is not None:
            return self._line(done, total, unit, what)
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        bar = self.bars.get(what)
        if bar is None:  # starts at the first report, so its rate counts from there
            bar = self.bars[what] = tqdm(total=total, initial=done, desc=f"  {what}" if what else "  progress",
                                         unit=unit, leave=False, file=sys.stderr)
        else:
            bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()
            del self.bars[what]

    def _line(self, done, total, unit, what):
        now = time.perf_counter()
        first, done0, last = self.seen.setdefault(what, (now, done, now))
        end = total is not None and done >= total
        if not end and now - last < LINE_EVERY_S:
            return
        self.seen[what] = (first, done0, now)
        rate = (done - done0) / (now - first) if now > first and done > done0 else None
        left = f", about {_fmt_s((total - done) / rate)} left" if rate and total is not None and not end else ""
        self.lines(f"  {self.name}: {what or 'progress'} {done}/{total if total is not None else '?'} {unit}"
                   f" ({_fmt_s(now - first)} since its first report{left})")
        if end:
            del self.seen[what]

    def close(self):
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
        self.seen.clear()


#: seconds between two progress lines of one figure in a worker process (``_Inner`` with ``lines``)
LINE_EVERY_S = 60.0


#: the cost counted for a figure without a recorded wall time (s), in the schedule's estimates.
UNKNOWN_COST_S = 60.0


def _cost(group: Sequence[str], est: dict) -> float:
    """The expected time of a group of figures from their recorded times (``UNKNOWN_COST_S`` if none)."""
    return sum(UNKNOWN_COST_S if est[n] is None else est[n] for n in group)


def _groups(todo: Sequence[str], est: dict) -> list[list[str]]:
    """The figures of ``todo`` grouped by module (figures of one module share computations through
    module-level caches, so they run in one process, in order), largest expected time first (``_cost``)."""
    by_mod: dict[str, list[str]] = {}
    for n in todo:
        by_mod.setdefault(FIGURES[n].module, []).append(n)
    cost = {m: _cost(g, est) for m, g in by_mod.items()}
    return [by_mod[m] for m in sorted(by_mod, key=lambda m: -cost[m])]


def _plan(groups: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """The prerequisites to build first (needed by a group, not ready) and the groups reordered: those that
    need none of them first, then the others (each part still largest first); the order in which the
    groups are listed, and taken by ``_pick`` among equals."""
    missing = []
    for g in groups:
        for p in NEEDS.get(FIGURES[g[0]].module, ()):
            if p not in missing and not PREREQUISITES[p].ready():
                missing.append(p)
    return missing, [g for g in groups if not _waits(g, missing)] + [g for g in groups if _waits(g, missing)]


def _waits(group: Sequence[str], unbuilt) -> bool:
    """Whether ``group``'s module needs a prerequisite of ``unbuilt`` (not built yet)."""
    return bool(set(NEEDS.get(FIGURES[group[0]].module, ())) & set(unbuilt))


def _pick(pending: Sequence[Sequence[str]], unbuilt, cost: Callable) -> Optional[Sequence[str]]:
    """The group a free worker takes next: the largest expected ``cost`` among the pending groups whose
    prerequisites are built (the first of equals); None while every pending group waits for a build."""
    ready = [g for g in pending if not _waits(g, unbuilt)]
    return max(ready, key=cost) if ready else None


def _schedule(builds: dict, groups: Sequence[Sequence[str]], cost: Callable, jobs: int,
              busy: Sequence[tuple[float, Optional[str]]] = ()) -> float:
    """The expected wall time of ``_run_parallel``'s policy, simulated: ``jobs`` workers; the prerequisite
    builds (name -> expected seconds) start first, one per free worker; then each free worker takes
    ``_pick``'s group, and idles until a build it needs is done when every pending group waits for one.
    ``busy``: what the workers are running now, as (expected seconds left, the build's name or None for a
    group): those workers are free only then, and a build in it is done only then (the remainder of a run
    under way)."""
    if len(busy) > max(1, jobs):
        raise ValueError(f"busy: {len(busy)} running items for {jobs} worker(s)")
    free = [max(0.0, float(left)) for left, _ in busy] + [0.0] * (max(1, jobs) - len(busy))
    todo_builds = list(builds)
    done_at = {name: max(0.0, float(left)) for left, name in busy if name is not None}
    pending = list(groups)
    while todo_builds or pending:
        i = free.index(min(free))
        t = free[i]
        if todo_builds:
            b = todo_builds.pop(0)
            free[i] = done_at[b] = t + float(builds[b])
            continue
        unbuilt = [b for b, at in done_at.items() if at > t]
        g = _pick(pending, unbuilt, cost)
        if g is None:  # idle until the next build finishes
            free[i] = min(done_at[b] for b in unbuilt)
            continue
        pending.remove(g)
        free[i] = t + cost(g)
    return max(free)


def _worker_init(modules: Sequence[str], threads: int) -> None:
    import torch

    torch.set_num_threads(int(threads))
    missing = load(modules)
    if missing:  # pragma: no cover - the parent loaded the same modules
        raise RuntimeError(f"figure modules not loadable in a worker: {missing}")


def _worker_run(names: Sequence[str], out: str, quick: bool, estimate_from: Sequence[str]) -> dict[str, dict]:
    import os

    tag = f"[worker {os.getpid()}]"
    return run_figures(names, out, quick=quick, progress=False, skip_current=False, estimate_from=estimate_from,
                       log=lambda s: print(f"{tag} {s}", file=sys.stderr, flush=True), progress_lines=True)


def _worker_build(name: str) -> float:
    import os

    from . import progress as _progress

    t0 = time.perf_counter()
    tag = f"[worker {os.getpid()}]"
    print(f"{tag} building {name} (once; cached)", file=sys.stderr, flush=True)
    inner = _Inner(False, name, lambda s: print(f"{tag} {s}", file=sys.stderr, flush=True))
    with _progress.listening(inner):
        PREREQUISITES[name].build()
    return time.perf_counter() - t0


def _run_parallel(build_first: list[str], groups: list[list[str]], out: Path, quick: bool,
                  estimate_from: Sequence[Path], jobs: int, modules: Sequence[str], threads: int, est: dict,
                  log: Callable[[str], None]) -> dict[str, dict]:
    """Build the prerequisites ``build_first``, then run the groups of figures, in ``jobs`` worker processes
    (spawned, ``threads`` torch threads each): whenever a worker is free it takes the largest pending group
    whose prerequisites are built (``_pick``), so a group that waits for a build never holds a worker and
    the largest groups start as soon as they can; log each build and group as it finishes, with the
    expected remainder (``_schedule``)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")

    def cost(g):
        return _cost(g, est)

    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                             initargs=(list(modules), threads)) as pool:
        unbuilt, pending = set(build_first), list(groups)
        inflight = {pool.submit(_worker_build, p): ("build", p) for p in build_first}
        started = {fut: time.perf_counter() for fut in inflight}

        def fill():
            while len(inflight) < jobs and pending:
                g = _pick(pending, unbuilt, cost)
                if g is None:
                    return
                pending.remove(g)
                fut = pool.submit(_worker_run, g, str(out), quick, [str(p) for p in estimate_from])
                inflight[fut], started[fut] = ("group", g), time.perf_counter()

        fill()
        while inflight:
            finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for fut in finished:
                kind, what = inflight.pop(fut)
                if kind == "build":  # a failed build fails the run here, before a group needing it starts
                    log(f"built {what} in {_fmt_s(fut.result())}")
                    unbuilt.discard(what)
                    continue
                results.update(fut.result())
                left = pending + [g for k, g in inflight.values() if k == "group"]
                # what runs now is charged only its expected time left, so the remainder falls as it runs
                now = time.perf_counter()
                busy = [((PREREQUISITES[w].cost_s if k == "build" else cost(w)) - (now - started[f]),
                         w if k == "build" else None) for f, (k, w) in inflight.items()]
                rest = _schedule({}, pending, cost, jobs, busy=busy)
                log(f"done: {', '.join(what)} ({now - t0:.0f} s since start); "
                    + (f"{len(left)} group(s) left, about {_fmt_s(rest)} more by recorded times"
                       if left else "all groups done"))
            fill()
    return results


def run_figures(names: Sequence[str], out: str | Path, quick: bool = False, progress: bool = True,
                skip_current: bool = True, estimate_from: Sequence[Path] = (),
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), jobs: int = 1,
                modules: Sequence[str] = (), threads: int = 1, progress_lines: bool = False) -> dict[str, dict]:
    """Compute the named figures into ``out`` (each PNG + JSON written as soon as it is finished).

    ``skip_current``: leave figures whose output is current (see the module docstring). Before starting it
    checks that ``out`` is writable and logs the plan with each figure's expected time (the wall time its
    JSON in ``out``, else in ``estimate_from``, recorded at the same settings) and the expected total;
    after each figure, the time taken and the expected remainder. Returns name -> record of computed figures.

    ``jobs`` > 1: the figures, grouped by module (see ``_groups``), run in that many spawned worker processes
    with ``threads`` torch threads each; ``modules`` are the figure modules the workers import to find the
    figures (the caller's list). The plan then gives the expected wall time of that schedule.
    ``progress_lines``: progress inside a figure as ``log`` lines (throttled) instead of bars (workers)."""
    from . import progress as _progress

    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"only: unknown figure(s) {unknown}; registered: {sorted(FIGURES)}")
    out = Path(out)
    check_writable(out)
    _agg()
    todo, est = [], {}
    for n in names:
        if skip_current and is_current(n, out, quick):
            log(f"  {n:24s} current (same settings and code), skipped")
            continue
        todo.append(n)
        est[n] = recorded_wall_time(n, quick, [out, *estimate_from])
        log(f"  {n:24s} to compute, expected {_fmt_s(est[n])}")
    known = [e for e in est.values() if e is not None]
    n_unknown = len(todo) - len(known)
    groups = _groups(todo, est) if jobs > 1 else [todo]
    parallel = jobs > 1 and len(groups) > 1
    if parallel:
        build_first, groups = _plan(groups)
    if todo:
        if parallel:
            span = _schedule({p: PREREQUISITES[p].cost_s for p in build_first}, groups, lambda g: _cost(g, est), jobs)
            total = (f"expected {_fmt_s(span)} on {jobs} processes ({_fmt_s(sum(known))} of recorded wall times"
                     + (f", {UNKNOWN_COST_S:.0f} s counted for each figure without one" if n_unknown else "")
                     + "".join(f", {_fmt_s(PREREQUISITES[p].cost_s)} to build {p} first" for p in build_first)
                     + ")")
        else:
            total = (f"expected {_fmt_s(sum(known))} (recorded wall times, one process)" if known
                     else "no recorded time")
        log(f"{len(todo)} figure(s) to compute into {out}/ ({'default' if quick else 'full'} settings): {total}"
            + (f"; {n_unknown} figure(s) without a recorded time at these settings" if n_unknown and known else ""))
    if parallel:
        if not modules:
            raise ValueError("modules: jobs > 1 needs the figure modules for the worker processes to import")
        return _run_parallel(build_first, groups, out, quick, estimate_from, jobs, modules, threads, est, log)
    results = {}
    paced = [0.0, 0.0]  # wall time and recorded time of the figures done so far that had a recorded time
    for i, name in enumerate(todo):
        spec = FIGURES[name]
        inner = _Inner(progress, name, log if progress_lines else None)
        t0 = time.perf_counter()
        try:
            with _progress.listening(inner):
                res = spec.fn(quick=quick)
        finally:
            inner.close()
        wall = time.perf_counter() - t0
        if spec.draw is None:
            fig, data = res
            data = to_jsonable(data)
        else:
            data = json.loads(json.dumps(to_jsonable(res)))  # draw exactly what the JSON will hold
            fig = spec.draw(data)
        record = {"figure": name, "description": spec.description, "quick": quick,
                  "settings": "default" if quick else "full", "wall_time_s": round(wall, 2),
                  "code_hash": code_hash(spec.module)}
        if spec.verdicts is not None:
            record["verdicts"] = check_verdicts(name, spec.verdicts(data))
        record["data"] = data
        atomic_write_bytes(out / f"{name}.png", _png(fig))
        atomic_write_json(out / f"{name}.json", record)
        results[name] = record
        if est[name] is not None and est[name] > 1.0:  # this run's pace against the recorded times
            paced[0] += wall
            paced[1] += est[name]
        rest = [est[n] for n in todo[i + 1:]]
        left = sum(e for e in rest if e is not None)
        pace = f", {_fmt_s(left * paced[0] / paced[1])} at this run's pace" if paced[1] > 0 and left > 0 else ""
        log(f"[{i + 1}/{len(todo)}] {name}: {_fmt_s(wall)} (expected {_fmt_s(est[name])}) -> {out}/{name}.png, .json"
            + (f"; remaining {_fmt_s(left)} recorded{pace}" + (" + unknown" if None in rest else "") if rest else ""))
    return results


def replot_figures(names: Sequence[str], out: str | Path,
                   log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, str]:
    """Re-draw the named figures from their JSONs in ``out`` (no computation; the JSONs are not touched):
    rewrites ``<name>.png``. Returns {name: why it was not re-drawn} for those that could not be."""
    out = Path(out)
    check_writable(out)
    _agg()
    failed = {}
    for name in names:
        spec = FIGURES[name]
        rec = _read_record(out / f"{name}.json")
        if spec.draw is None:
            failed[name] = "draws while computing (no draw function); recompute it"
        elif rec is None:
            failed[name] = f"no readable {out / (name + '.json')}; compute it first"
        else:
            try:
                fig = spec.draw(rec["data"])
            except KeyError as e:
                failed[name] = f"its JSON lacks {e} (written by an older version); recompute it"
                log(f"{name}: not re-drawn: {failed[name]}")
                continue
            atomic_write_bytes(out / f"{name}.png", _png(fig))
            if spec.verdicts is not None:  # the verdicts follow the verdict function's current wording
                verdicts = check_verdicts(name, spec.verdicts(rec["data"]))
                if verdicts != rec.get("verdicts"):
                    rec = {k: v for k, v in rec.items() if k != "data"} | {"verdicts": verdicts, "data": rec["data"]}
                    atomic_write_json(out / f"{name}.json", rec)
            log(f"{name}: re-drawn from {out}/{name}.json -> {name}.png")
            continue
        log(f"{name}: not re-drawn: {failed[name]}")
    return failed
