"""The documentation stays true to the repository: docs/results.md is what tools/make_results.py renders
from paper_figs/*.json today, every link between README and docs/ pages (and every #anchor) resolves,
and every ``docs/theory.md`` citation in the code names a section and equation that exist."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THEORY = ROOT / "docs" / "theory.md"
CODE_DIRS = ("theory", "sims", "imaging", "diffsteer", "benchmarks", "tests", "tools")


def _make_results():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "tools" / "make_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _md_pages():
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (except - and _), spaces -> '-'."""
    h = re.sub(r"`", "", heading.strip().lower())
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def _anchors(page: Path) -> set:
    out, seen = set(), {}
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m and not in_code:
            s = _slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return out


def _links(page: Path):
    """Markdown link targets ``](target)`` outside fenced code, without URLs."""
    text, in_code = [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            text.append(line)
    for target in re.findall(r"\]\(([^)\s]+)\)", "\n".join(text)):
        if not re.match(r"[a-z]+://|mailto:", target):
            yield target


def _code_files():
    for d in CODE_DIRS:
        yield from sorted((ROOT / d).rglob("*.py"))


def test_results_page_is_rendered_from_the_current_jsons():
    """docs/results.md equals a fresh rendering (fix: ``python tools/make_results.py``)."""
    mr = _make_results()
    page = ROOT / "docs" / "results.md"
    assert page.exists(), "docs/results.md is missing: run python tools/make_results.py"
    assert page.read_text() == mr.render(mr.FIG_DIR), "docs/results.md is out of date: run python tools/make_results.py"


def test_every_figure_json_appears_on_the_results_page():
    text = (ROOT / "docs" / "results.md").read_text()
    for p in sorted((ROOT / "paper_figs").glob("*.json")):
        assert f"### `{p.stem}`" in text, f"{p.name} has no section in docs/results.md"


def test_results_renderer_falls_back_for_an_unknown_figure(tmp_path):
    """A figure without a renderer still shows its scalars, settings and verdicts (so a new figure never
    breaks the page)."""
    import json

    mr = _make_results()
    (tmp_path / "claims_new.json").write_text(json.dumps({
        "figure": "claims_new", "description": "a new figure", "quick": True, "wall_time_s": 1.5,
        "verdicts": {"claim A": {"verdict": "holds only when D >= 32", "ratio": 1.25}},
        "data": {"config": {"D": [2, 8]}, "ratio": 1.25, "curve": list(range(100))}}))
    text = mr.render(tmp_path)
    assert "### `claims_new`" in text and "quick settings" in text
    assert "**claim A**: holds only when D >= 32 (ratio: 1.25)" in text
    assert "| `ratio` | 1.25 |" in text and "`D` = (2, 8)" in text


def test_readme_verdict_table_is_rendered_from_the_current_jsons():
    """README's verdict table (between its markers) equals a fresh rendering (fix: ``python tools/make_results.py``)."""
    mr = _make_results()
    text = (ROOT / "README.md").read_text()
    assert text == mr.render_readme(text, mr.FIG_DIR), "README's verdict table is out of date: run python tools/make_results.py"


def _verdict_doc(name, words, settings="full"):
    return {"figure": name, "description": "d", "quick": settings == "default", "settings": settings, "wall_time_s": 1.0,
            "verdicts": [{"claim": f"Paper (A et al.): claim {i}", "verdict": f"{w} (criterion: x (y) within 2 se)",
                          "numbers": "1.5 +- 0.2 (3 seeds)", "regime": "toy", "budget": "10 queries"}
                         for i, w in enumerate(words)],
            "data": {"x": 1.0}}


def test_verdicts_render_per_figure_and_in_readme_with_the_default_run(tmp_path):
    """A figure's verdicts appear as a table on the results page and as rows of README's table, whose last
    column compares the leading verdict word with the default run's for the same claim ("not run" without
    it); the criterion is left to the results page."""
    import json

    mr = _make_results()
    (tmp_path / "claims_x.json").write_text(json.dumps(_verdict_doc("claims_x", ["holds", "does not hold", "holds"])))
    page = mr.render(tmp_path)
    assert "| claim | verdict | numbers | regime | budget |" in page
    assert "| Paper (A et al.): claim 1 | does not hold (criterion: x (y) within 2 se) | 1.5 +- 0.2 (3 seeds) |" in page
    readme = f"# r\n\n{mr.BEGIN}\nSTALE ROW\n{mr.END}\nrest\n"
    new = mr.render_readme(readme, tmp_path)
    assert "STALE ROW" not in new and new.endswith(f"{mr.END}\nrest\n")
    assert "| Paper (A et al.) | claim 0 | holds | 1.5 +- 0.2 (3 seeds) | [`claims_x`](docs/results.md#claims_x) | not run |" in new
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "claims_x.json").write_text(json.dumps(
        _verdict_doc("claims_x", ["holds only when D >= 8", "does not hold"], settings="default")))
    rows = [r for r in mr.render_readme(readme, tmp_path).splitlines() if "claims_x" in r]
    assert [r.rsplit("|", 2)[1].strip() for r in rows] == ["no (default: holds only when)", "yes", "no verdict"]
    with pytest.raises(ValueError, match="markers"):
        mr.render_readme("# no markers\n", tmp_path)


def test_check_fails_when_readme_or_results_page_is_stale(tmp_path):
    """``make_results --check`` exits 1 when the README block or the results page differs from a fresh
    rendering, 0 after a write."""
    import json

    mr = _make_results()
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "claims_x.json").write_text(json.dumps(_verdict_doc("claims_x", ["holds"])))
    readme, page = tmp_path / "README.md", tmp_path / "results.md"
    readme.write_text(f"{mr.BEGIN}\n{mr.END}\n")
    args = ["--figs", str(figs), "--readme", str(readme), "--out", str(page)]
    assert mr.main(args + ["--check"]) == 1  # neither written yet
    assert mr.main(args) == 0 and mr.main(args + ["--check"]) == 0
    readme.write_text(readme.read_text().replace("| holds |", "| does not hold |"))
    assert mr.main(args + ["--check"]) == 1  # README's block stale
    mr.main(args)
    page.write_text(page.read_text() + "edited\n")
    assert mr.main(args + ["--check"]) == 1  # results page stale


def test_compare_runs_matches_each_json_with_the_committed_one_at_its_settings(tmp_path, capsys):
    """``make_results --compare RUN_DIR`` pairs a full-settings JSON with ``paper_figs/<name>.json`` and a
    default one with ``paper_figs/default/<name>.json``, lists each verdict whose leading word differs (and
    claims with no committed counterpart), counts the rest as the same, and exits 1 only when a word differs."""
    import json

    mr = _make_results()
    figs, run = tmp_path / "figs", tmp_path / "run"
    (figs / "default").mkdir(parents=True)
    run.mkdir()
    (figs / "claims_x.json").write_text(json.dumps(_verdict_doc("claims_x", ["holds", "does not hold"])))
    (figs / "default" / "claims_x.json").write_text(json.dumps(
        _verdict_doc("claims_x", ["not resolved", "does not hold"], settings="default")))
    # a default-settings run: compared with the committed default run, not with the full one
    (run / "claims_x.json").write_text(json.dumps(
        _verdict_doc("claims_x", ["not resolved", "holds", "holds"], settings="default")))
    lines, counts = mr.compare_runs(run, figs)
    assert counts == {"same": 1, "differs": 1, "no committed": 1}
    assert lines[0] == "claims_x (default): claim 1: this run 'holds', committed 'does not hold'"
    assert lines[1].startswith("claims_x (default): no committed verdict for: Paper (A et al.): claim 2")
    assert mr.main(["--figs", str(figs), "--compare", str(run)]) == 1
    assert "1 of 2 verdicts state the committed run's word" in capsys.readouterr().out
    (run / "claims_x.json").write_text(json.dumps(_verdict_doc("claims_x", ["holds", "does not hold"])))  # full
    assert mr.compare_runs(run, figs)[1] == {"same": 2, "differs": 0, "no committed": 0}
    assert mr.main(["--figs", str(figs), "--compare", str(run)]) == 0
    with pytest.raises(FileNotFoundError, match="run_dir"):
        mr.compare_runs(tmp_path / "empty", figs)


@pytest.mark.parametrize("page", _md_pages(), ids=lambda p: p.name)
def test_links_between_pages_resolve(page):
    """Every relative link of README and docs/*.md points at an existing file, and every #anchor at a heading."""
    bad = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = page if not path else (page.parent / path).resolve()
        if not dest.exists():
            bad.append(f"{target} (no file {dest.relative_to(ROOT) if ROOT in dest.parents else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    assert not bad, f"{page.name}: broken links: {bad}"


def test_readme_mentions_of_docs_pages_exist():
    for name in re.findall(r"docs/[\w\-]+\.md", (ROOT / "README.md").read_text()):
        assert (ROOT / name).exists(), f"README names {name}, which does not exist"


def _theory_sections_and_equations():
    text = THEORY.read_text()
    sections = {int(n) for n in re.findall(r"^## §(\d+)\b", text, flags=re.M)}
    equations = set(re.findall(r"\((\d+\.\d+)\)", text))
    return sections, equations


def test_theory_page_has_the_numbered_sections():
    sections, equations = _theory_sections_and_equations()
    assert sections == set(range(1, 9)), f"docs/theory.md sections: {sorted(sections)}, expected §1 .. §8"
    for s in sections:  # every section numbers at least one equation (N.M)
        assert any(e.split(".")[0] == str(s) for e in equations), f"§{s} has no numbered equation"


#: a citation: docs/theory.md, then optional §N[.M] (lists and ranges: §4-5, §4, §5) and equations (N.M)
CITE = re.compile(r"docs/theory\.md((?:[ ,;]*(?:and\s+)?(?:§\s*\d+(?:\.\d+)?(?:\s*[-–]\s*§?\s*\d+(?:\.\d+)?)?"
                  r"|eqs?\.?\s*\(\d+\.\d+\)|\(\d+\.\d+\)(?:\s*[-–]\s*\(\d+\.\d+\))?))*)")


def test_code_citations_of_the_theory_page_exist():
    """Every ``docs/theory.md §N`` / ``(N.M)`` cited in a .py file names a section / equation of the page."""
    sections, equations = _theory_sections_and_equations()
    bad = []
    for f in _code_files():
        for i, line in enumerate(f.read_text().splitlines(), 1):
            for m in CITE.finditer(line):
                tail = m.group(1)
                for s in re.findall(r"§\s*(\d+)", tail) + re.findall(r"[-–]\s*(\d+)(?!\.\d)", tail):
                    if int(s) not in sections:
                        bad.append(f"{f.relative_to(ROOT)}:{i}: §{s}")
                for e in re.findall(r"\((\d+\.\d+)\)", tail):
                    if e not in equations:
                        bad.append(f"{f.relative_to(ROOT)}:{i}: ({e})")
    assert not bad, f"citations of docs/theory.md that do not exist: {bad}"


def test_readme_python_example_runs():
    """README's Python example runs as written, and its samples land on the tilted target it prints
    (mean (2, 0) of N(mu + S b / lam, S); 2000 samples: standard error 0.022 per coordinate, so 0.15 is
    about 7 standard errors, with room for the solver's discretisation bias)."""
    import contextlib
    import io

    import torch

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no Python example"
    ns: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(blocks[0], "README.md", "exec"), ns)
    assert torch.allclose(ns["x0"].mean(0), ns["data"].tilted(ns["reward"], ns["lam"]).means[0], atol=0.15)


def test_api_page_python_examples_run():
    """Every ```python block of docs/api.md runs as written (signatures are shown in plain blocks); the
    fine-tuning example's history counts one reward query per sample and step."""
    import contextlib
    import io

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)
    assert blocks, "docs/api.md has no Python example"
    for i, block in enumerate(blocks):
        ns: dict = {}
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block, f"docs/api.md block {i}", "exec"), ns)
        if "history" in ns:
            cfg = ns["config"]
            assert ns["history"][-1]["reward_queries_total"] == cfg.steps * cfg.batch_size


#: what code must not cite: the design notes and plans that are not in the repository, issue numbers, and
#: test letters of a plan (``test_b_...`` .. ``test_h_...``; not ``test_a_...``, an article, nor
#: ``test_h_transform...``); the mathematics is cited as docs/theory.md §N or a paper's equation
NOT_CITED = re.compile(r"THEORY\.md|GRADIENT_GUIDANCE|ARCHITECTURE\.md|ENGINE_API|PEERS\.md|DIGITS_PIPELINE"
                       r"|\.\./shared|\b[Ii]ssues? \d|\bdef test_[b-h]_(?!transform)")


def test_code_cites_only_what_ships():
    """No .py file cites a design note outside the repository, an issue number or a plan's test letter."""
    bad = [f"{f.relative_to(ROOT)}:{i}: {line.strip()[:80]}"
           for f in _code_files() if f.name != "test_docs.py"
           for i, line in enumerate(f.read_text().splitlines(), 1) if NOT_CITED.search(line)]
    assert not bad, f"{len(bad)} citation(s) of what the repository does not ship:\n" + "\n".join(bad)


def test_readme_times_table_lists_both_runs_and_their_sums(tmp_path):
    """README's run-time table (between its own markers) has a row per figure with the default and the full
    JSON's wall times, "-" where a run has none, and the sums."""
    import json

    mr = _make_results()
    (tmp_path / "default").mkdir()
    for folder, name, wall, settings in ((tmp_path, "claims_a", 120.0, "full"), (tmp_path, "claims_b", 30.0, "full"),
                                         (tmp_path / "default", "claims_a", 12.0, "default")):
        doc = _verdict_doc(name, ["holds"], settings)
        doc["wall_time_s"] = wall
        (folder / f"{name}.json").write_text(json.dumps(doc))
    readme = (f"{mr.BEGIN}\n{mr.END}\n{mr.TIMES_BEGIN}\nSTALE\n{mr.TIMES_END}\n"
              f"{mr.AGREE_BEGIN}\nSTALE\n{mr.AGREE_END}\n")
    new = mr.render_readme(readme, tmp_path)
    assert "STALE" not in new
    # claims_a's one verdict agrees ("holds" in both runs); claims_b has no default JSON
    assert "1 of the 1 verdicts of the default run agree" in new and "(1 without a default verdict)" in new
    assert "| `claims_a` | 12 s | 2.0 min |" in new and "| `claims_b` | - | 30 s |" in new
    assert "| **12 s** | **2.5 min** |" in new
