"""Whole runs of ``diffsteer figures``, per figure: the default (or ``--full``) settings run as several
configurations side by side in one invocation - by default with one worker process and with two - each
into its own fresh output folder and, unless ``--cache`` is given, its own fresh cache (so the pre-trained
models are trained inside the timed run, as on a fresh machine). Prints each figure's wall time (from the
JSON the run wrote), each run's total wall time, and the ratio of the runs' wall times to the first's.

    OMP_NUM_THREADS=1 python benchmarks/bench_figures.py                 # default settings, --jobs 1 vs 2
    python benchmarks/bench_figures.py --jobs 2                          # one run: the README's timing
    python benchmarks/bench_figures.py --full --jobs 2 --only gg_roff    # the papers' settings, some figures
    python benchmarks/bench_figures.py --cache ~/.cache/diffsteer        # warm cache (pre-trained models reused)

The runs go one after the other (not interleaved: each takes minutes to hours), so on a shared machine
compare them only when the load stayed the same; the script prints the load average before and after
each run for that reason. The figures' verdicts of every run are compared with the first run's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _load() -> str:
    try:
        return "load %.2f %.2f %.2f" % os.getloadavg()
    except OSError:  # pragma: no cover
        return "load unknown"


def run_once(jobs: int, full: bool, only, cache, workdir: Path) -> dict:
    out = workdir / f"out-jobs{jobs}"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["DIFFSTEER_CACHE"] = str(cache) if cache else str(workdir / f"cache-jobs{jobs}")
    cmd = [sys.executable, "-m", "diffsteer", "figures", "--out", str(out), "--jobs", str(jobs), "--no-progress",
           "--force"] + (["--full"] if full else []) + (["--only", *only] if only else [])
    print(f"# jobs {jobs}: {' '.join(cmd[2:])} (cache {env['DIFFSTEER_CACHE']}); {_load()}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    print(f"# jobs {jobs}: {wall:.0f} s wall; {_load()}", flush=True)
    figs = {}
    for p in sorted(out.glob("*.json")):
        rec = json.loads(p.read_text())
        figs[rec["figure"]] = {"wall": rec["wall_time_s"],
                               "verdicts": [v["verdict"].split(" (")[0] for v in rec.get("verdicts", [])]}
    return {"jobs": jobs, "wall": wall, "figures": figs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="worker processes of each run (default: 1 2)")
    p.add_argument("--full", action="store_true", help="the papers' settings (hours) instead of the default ones")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="only these figures")
    p.add_argument("--cache", default=None, help="a cache folder shared by the runs (default: a fresh one per run)")
    p.add_argument("--keep", default=None, help="keep the runs' outputs in this folder (default: a temporary one)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.keep) if a.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = [run_once(j, a.full, a.only, a.cache, work) for j in a.jobs]
    names = sorted({n for r in runs for n in r["figures"]})
    head = "".join(f"{'jobs ' + str(r['jobs']):>12s}" for r in runs)
    print(f"\n{'figure':26s}{head}   (figure wall time, s)")
    for n in names:
        cells = "".join(f"{r['figures'][n]['wall'] if n in r['figures'] else float('nan'):12.1f}" for r in runs)
        print(f"{n:26s}{cells}")
    print(f"{'whole run (wall)':26s}" + "".join(f"{r['wall']:12.1f}" for r in runs))
    print(f"{'ratio to the first run':26s}" + "".join(f"{r['wall'] / runs[0]['wall']:12.3f}" for r in runs))
    base = runs[0]["figures"]
    for r in runs[1:]:
        differ = [n for n in names if n in base and n in r["figures"]
                  and base[n]["verdicts"] != r["figures"][n]["verdicts"]]
        print(f"verdicts of jobs {r['jobs']} differing from jobs {runs[0]['jobs']}: {differ or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
