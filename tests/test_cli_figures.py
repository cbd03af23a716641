"""``diffsteer figures`` and the figure registry (theory.registry) on a tiny stand-in figure: output checked
writable before any work, figures written as they finish, current outputs skipped, re-drawing from the
JSON alone, the code version, readable files, threads, the cache folder, progress reports, messages."""
from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import torch

from diffsteer.cli import main
from diffsteer.runtime import configure_threads, missing_extra_message
from theory import progress, registry
from theory.cache import cache_dir
from theory.io import file_mode

CALLS = []


def _compute(quick=False):
    CALLS.append(quick)
    for k in range(3):
        progress.report(k + 1, 3, "round", "fake rounds")
    return {"x": [0.0, 1.0, 2.0], "y": [1.0, float("nan"), 4.0], "quick": quick}


def _draw(data):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot(data["x"], [v if isinstance(v, float) else float(v) for v in data["y"]])
    return fig


@pytest.fixture
def fake():
    CALLS.clear()
    registry.figure("zz_test_fake", "a stand-in figure", draw=_draw)(_compute)
    yield "zz_test_fake"
    registry.FIGURES.pop("zz_test_fake", None)


def _quiet(s):
    pass


def test_written_current_skipped_forced_and_settings_matter(tmp_path, fake):
    out = registry.run_figures([fake], tmp_path, progress=False, log=_quiet)
    rec = json.loads((tmp_path / f"{fake}.json").read_text())
    assert rec["quick"] is False and rec["code_hash"] == registry.code_hash(__name__) and rec["data"]["y"][1] == "nan"
    assert out[fake]["wall_time_s"] >= 0 and CALLS == [False]
    assert registry.is_current(fake, tmp_path, quick=False) and not registry.is_current(fake, tmp_path, quick=True)
    assert registry.run_figures([fake], tmp_path, progress=False, log=_quiet) == {} and CALLS == [False]
    registry.run_figures([fake], tmp_path, progress=False, skip_current=False, log=_quiet)
    registry.run_figures([fake], tmp_path, quick=True, progress=False, log=_quiet)
    assert CALLS == [False, False, True]
    (tmp_path / f"{fake}.png").unlink()  # a missing PNG makes the output stale
    assert not registry.is_current(fake, tmp_path, quick=True)


def test_files_are_created_with_the_umask_mode(tmp_path, fake):
    registry.run_figures([fake], tmp_path, progress=False, log=_quiet)
    for suffix in (".png", ".json"):
        assert stat.S_IMODE(os.stat(tmp_path / f"{fake}{suffix}").st_mode) == file_mode()


def test_replot_draws_from_the_json_alone_and_leaves_it(tmp_path, fake):
    registry.run_figures([fake], tmp_path, progress=False, log=_quiet)
    png, js = (tmp_path / f"{fake}.png").read_bytes(), (tmp_path / f"{fake}.json").read_bytes()
    (tmp_path / f"{fake}.png").unlink()
    assert registry.replot_figures([fake], tmp_path, log=_quiet) == {}
    assert (tmp_path / f"{fake}.png").read_bytes() == png and (tmp_path / f"{fake}.json").read_bytes() == js
    assert CALLS == [False]  # nothing recomputed
    rec = json.loads(js)
    del rec["data"]["x"]
    (tmp_path / f"{fake}.json").write_text(json.dumps(rec))
    assert "lacks 'x'" in registry.replot_figures([fake], tmp_path, log=_quiet)[fake]


def test_unwritable_out_is_refused_before_any_work(tmp_path, fake):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for bad in (blocker, blocker / "sub"):
        with pytest.raises(ValueError, match="out:"):
            registry.run_figures([fake], bad, progress=False, log=_quiet)
    assert CALLS == []


def test_progress_reports_reach_the_listener():
    seen = []
    with progress.listening(lambda *a: seen.append(a)):
        _compute()
    progress.report(1, 1)  # no listener: nothing happens
    assert seen == [(k, 3, "round", "fake rounds") for k in (1, 2, 3)]


def test_worker_progress_lines_are_throttled_and_end_with_the_total(monkeypatch):
    """In a worker (bars would interleave) a figure's progress is a log line per ``what`` at most every
    LINE_EVERY_S seconds, plus one at its end; the time left is the remaining units at the rate so far."""
    clock = [0.0]
    monkeypatch.setattr(registry.time, "perf_counter", lambda: clock[0])
    lines = []
    inner = registry._Inner(False, "fig", lines.append)
    for k in range(1, 10):  # a report every 10 s, of 100 units in all
        inner(k * 10, 100, "round", "rounds")
        clock[0] += 10.0
    assert len(lines) == 1  # the first report (10 units at t = 0) opens the clock; at t = 60 s one line
    assert "fig: rounds 70/100 round" in lines[0] and "about 30 s left" in lines[0]  # 60 units in 60 s, 30 to go
    inner(100, 100, "round", "rounds")
    assert len(lines) == 2 and "100/100" in lines[1] and "left" not in lines[1]
    with progress.listening(inner):
        _compute()  # a new 'what' after the end starts over: only its end line (3/3) within 60 s
    assert len(lines) == 3 and "fake rounds 3/3 round" in lines[2]


def test_code_hash_follows_first_party_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    return 1\n")
    (pkg / "c.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "FIRST_PARTY", (*registry.FIRST_PARTY, "fakepkg"))
    monkeypatch.setattr(registry, "_HASHES", {})
    h = registry.code_hash("fakepkg.a")
    (pkg / "c.py").write_text("X = 2\n")  # not imported by a: same version
    registry._HASHES.clear()
    assert registry.code_hash("fakepkg.a") == h
    (pkg / "b.py").write_text("def f():\n    return 2\n")  # imported by a: new version
    registry._HASHES.clear()
    assert registry.code_hash("fakepkg.a") != h
    sys.modules.pop("fakepkg", None)


def test_code_hash_leaves_out_the_runner(monkeypatch):
    """A change to the registry or the progress reporting (they compute no figure's numbers) keeps every
    figure current; the hashed sources of a real figure do not include them."""
    monkeypatch.setattr(registry, "_HASHES", {})
    h = registry.code_hash("sims.fig_theory")
    real = registry._module_file
    fake = {m: real(m).with_name("does-not-exist.py") for m in registry.RUNNER_MODULES}
    monkeypatch.setattr(registry, "_module_file", lambda name: fake.get(name) or real(name))
    registry._HASHES.clear()
    assert registry.code_hash("sims.fig_theory") == h  # the runner's files are never read


def test_real_figures_hash_their_shared_code():
    """theory_tilting's version covers the grid estimators it imports and the solver."""
    assert registry.code_hash("sims.fig_theory") != registry.code_hash("sims.grid2d")
    assert registry.code_hash("sims.fig_theory") == registry.code_hash("sims.fig_theory")


def test_cli_requires_out_outside_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["figures", "--only", "theory_tilting"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["figures", "--only", "no_such_figure", "--out", str(tmp_path)]) == 2
    assert "only: unknown" in capsys.readouterr().err


def test_cli_threads_option_and_default(monkeypatch):
    # the session's thread count is restored after the test by conftest's _restore_threads
    assert main(["figures", "--list", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    assert main(["figures", "--list"]) == 0
    assert torch.get_num_threads() == 1  # the small networks' default: one thread per process
    with pytest.raises(ValueError, match="threads"):
        configure_threads(0)


def test_missing_extra_and_missing_module_messages():
    assert "pip install 'diffsteer[imaging]'" in missing_extra_message(ModuleNotFoundError("x", name="diffusers"))
    assert missing_extra_message(ModuleNotFoundError("x", name="numpy")) is None
    why = registry.load(["sims.fig_theory", "no_such_package_xyz.figures"])
    assert list(why) == ["no_such_package_xyz.figures"] and "no_such_package_xyz" in why["no_such_package_xyz.figures"]


def test_cache_folder_is_the_sessions_temporary_one(monkeypatch, tmp_path):
    from pathlib import Path

    assert Path.home() not in cache_dir().parents  # conftest points it at a temporary folder
    monkeypatch.setenv("DIFFSTEER_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DIFFSTEER_CACHE")
    assert cache_dir().name == "diffsteer"  # the platform's user cache folder


def test_verdicts_are_checked_written_and_follow_replot(tmp_path, fake):
    wording = ["holds"]

    def verdicts(data):
        assert data["y"][1] == "nan"  # the data as stored in the JSON
        return [{"claim": "y rises", "verdict": f"{wording[0]} (y[2] - y[0] = {data['y'][2] - data['y'][0]})",
                 "numbers": "3.0", "regime": "fake", "budget": "none"}]

    registry.figure("zz_test_fake", "a stand-in figure", draw=_draw, verdicts=verdicts)(_compute)
    registry.run_figures([fake], tmp_path, quick=True, progress=False, log=_quiet)
    rec = json.loads((tmp_path / f"{fake}.json").read_text())
    assert rec["settings"] == "default" and rec["verdicts"][0]["verdict"] == "holds (y[2] - y[0] = 3.0)"
    assert registry.verdict_word(rec["verdicts"][0]["verdict"]) == "holds"
    wording[0] = "does not hold"  # a changed verdict function: replot rewrites the verdicts, not the data
    registry.replot_figures([fake], tmp_path, log=_quiet)
    rec2 = json.loads((tmp_path / f"{fake}.json").read_text())
    assert rec2["verdicts"][0]["verdict"].startswith("does not hold") and rec2["data"] == rec["data"]
    assert registry.verdict_word("holds only when D <= 8") == "holds only when"
    for bad in ([{"claim": "c", "verdict": "maybe", "numbers": "", "regime": "", "budget": ""}],
                [{"claim": "c", "verdict": "holds"}], {"claim": "c"}):
        with pytest.raises(ValueError, match="verdict"):
            registry.check_verdicts("x", bad)


_MOD = '''
import os
from pathlib import Path

from theory.registry import figure, needs, prerequisite

MARK = Path(os.environ["ZZPAR_MARK"])
prerequisite("zzpar-pre", ready=MARK.exists, build=lambda: MARK.write_text(str(os.getpid())), cost_s=1.0)
if "{name}" == "zzpar_two":
    needs(__name__, "zzpar-pre")


def _draw(data):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, data["v"]])
    return fig


@figure("{name}_a", "first of module {name}", draw=_draw)
def a(quick=False):
    return {{"v": 1.0, "pid": os.getpid()}}


@figure("{name}_b", "second of module {name}", draw=_draw)
def b(quick=False):
    return {{"v": 2.0, "pid": os.getpid()}}
'''


def test_parallel_jobs_run_each_module_in_one_worker_process(tmp_path, monkeypatch):
    """--jobs 2: two figure modules in two spawned workers; the figures of one module share a process; a
    prerequisite that one module needs is built first, once, in a worker, and the module needing it goes
    after the one that does not."""
    monkeypatch.setenv("ZZPAR_MARK", str(tmp_path / "built"))
    pkg = tmp_path / "src"
    pkg.mkdir()
    for m in ("zzpar_one", "zzpar_two"):
        (pkg / f"{m}.py").write_text(_MOD.format(name=m))
    monkeypatch.syspath_prepend(str(pkg))
    mods = ["zzpar_one", "zzpar_two"]
    try:
        names = [n for n in registry.ordered_names(mods) if n.startswith("zzpar_")]
        assert names == ["zzpar_one_a", "zzpar_one_b", "zzpar_two_a", "zzpar_two_b"]
        out = tmp_path / "out"
        logs = []
        res = registry.run_figures(names, out, quick=True, progress=False, log=logs.append, jobs=2, modules=mods)
        assert sorted(res) == sorted(names)
        pid = {n: json.loads((out / f"{n}.json").read_text())["data"]["pid"] for n in names}
        assert pid["zzpar_one_a"] == pid["zzpar_one_b"] and pid["zzpar_two_a"] == pid["zzpar_two_b"]
        assert os.getpid() not in pid.values()
        assert any("on 2 processes" in s for s in logs) and any("all groups done" in s for s in logs)
        assert any("to build zzpar-pre first" in s for s in logs) and any("built zzpar-pre" in s for s in logs)
        assert int((tmp_path / "built").read_text()) not in (os.getpid(),)
        assert registry._plan([["zzpar_two_a"], ["zzpar_one_a"]]) == ([], [["zzpar_two_a"], ["zzpar_one_a"]])
        (tmp_path / "built").unlink()
        assert registry._plan([["zzpar_two_a"], ["zzpar_one_a"]]) == (["zzpar-pre"], [["zzpar_one_a"], ["zzpar_two_a"]])
        assert registry.run_figures(names, out, quick=True, progress=False, log=_quiet, jobs=2, modules=mods) == {}
        with pytest.raises(ValueError, match="modules"):
            registry.run_figures(names, out, quick=True, progress=False, log=_quiet, jobs=2, skip_current=False)
    finally:
        for n in list(registry.FIGURES):
            if n.startswith("zzpar_"):
                registry.FIGURES.pop(n)
        registry.PREREQUISITES.pop("zzpar-pre", None)
        registry.NEEDS.pop("zzpar_two", None)
        with pytest.raises(ValueError, match="needs: unknown"):
            registry.needs("zzpar_two", "zzpar-pre")


def test_schedule_takes_the_largest_ready_group_and_waits_for_builds(monkeypatch):
    """The simulated policy of _run_parallel: builds first, then the largest group whose prerequisites are
    built; a group needing a build starts when the build is done, ahead of smaller groups still pending."""
    monkeypatch.setattr(registry, "FIGURES", {n: registry.FigureSpec(n, lambda quick=False: {}, "", f"zzs_{n}")
                                              for n in ("big", "img", "s1", "s2")}, raising=True)
    monkeypatch.setattr(registry, "NEEDS", {"zzs_img": ("pre",)})
    cost = {"big": 10.0, "img": 8.0, "s1": 3.0, "s2": 3.0}.__getitem__
    groups = [["big"], ["s1"], ["s2"], ["img"]]
    c = lambda g: cost(g[0])  # noqa: E731
    # no build: largest first, each to the first free worker: big | img, then s1 (t 8), s2 (t 10)
    assert registry._schedule({}, groups, c, 2) == 13.0
    assert registry._schedule({}, groups, c, 1) == 24.0
    # build 4 s on worker 0 while big runs on worker 1; at t = 4 img (8) is ready and larger than s1, s2:
    # worker 0 runs img to t = 12, worker 1 big to 10, then s1 (10 -> 13), s2 (12 -> 15)
    assert registry._schedule({"pre": 4.0}, groups, c, 2) == 15.0
    # one worker: the build, then img (largest ready after it)... all serial: 4 + 24
    assert registry._schedule({"pre": 4.0}, groups, c, 1) == 28.0
    assert registry._pick(groups, {"pre"}, c) == ["big"] and registry._pick([["img"]], {"pre"}, c) is None
    # the remainder of a run under way: the build has 1 s left on worker 0, big 6 s on worker 1; pending
    # img waits for the build (t = 1 -> 9 on worker 0), s1 on worker 1 at 6 -> 9, s2 at 9 -> 12
    pend = [["s1"], ["s2"], ["img"]]
    assert registry._schedule({}, pend, c, 2, busy=[(1.0, "pre"), (6.0, None)]) == 12.0
    # an item over its expected time counts as finishing now; more running items than workers is refused
    assert registry._schedule({}, [["s1"]], c, 1, busy=[(-5.0, None)]) == 3.0
    with pytest.raises(ValueError, match="busy"):
        registry._schedule({}, [], c, 1, busy=[(1.0, None), (1.0, None)])


def test_cli_default_settings_go_to_paper_figs_default_and_full_to_paper_figs(monkeypatch, capsys):
    """From the checkout: the default (reduced) settings write into paper_figs/default/, --full into the
    committed paper_figs/; --full with the old --quick, and --jobs 0, are refused with the option named."""
    from pathlib import Path

    from diffsteer import cmd_figures

    root = Path(cmd_figures.__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    assert cmd_figures.repo_paper_figs(full=False) == root / "paper_figs" / "default"
    assert cmd_figures.repo_paper_figs(full=True) == root / "paper_figs"
    assert main(["figures", "--full", "--quick", "--list"]) == 2
    assert "full:" in capsys.readouterr().err
    assert main(["figures", "--jobs", "0", "--list"]) == 2
    assert "jobs:" in capsys.readouterr().err
