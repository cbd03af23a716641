"""tools/make_results.py with the third verdict word: ``default_agrees`` says "not resolved by default" where the
default run resolves neither the claim nor its opposite, and ``agreement_counts`` / ``--summary`` count the
three outcomes (on synthetic JSONs in a temporary folder)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _make_results():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "tools" / "make_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _v(claim, word):
    return {"claim": claim, "verdict": f"{word} (criterion: x)", "numbers": "1 +- 0.1", "regime": "r", "budget": "b"}


def test_default_agrees_and_the_three_counts(tmp_path, capsys):
    mr = _make_results()
    full = [_v("a", "holds"), _v("b", "does not hold"), _v("c", "holds only when N in {1}"), _v("d", "holds"),
            _v("e", "not resolved"), _v("f", "holds")]
    dflt = [_v("a", "holds"), _v("b", "not resolved"), _v("c", "not resolved"), _v("d", "does not hold"),
            _v("e", "not resolved")]
    (tmp_path / "default").mkdir()
    (tmp_path / "fig.json").write_text(json.dumps({"figure": "fig", "verdicts": full}))
    (tmp_path / "default" / "fig.json").write_text(json.dumps({"figure": "fig", "verdicts": dflt}))
    got = [mr.default_agrees("fig", v, tmp_path) for v in full]
    assert got == ["yes", "not resolved by default (full: does not hold)",
                   "not resolved by default (full: holds only when)", "no (default: does not hold)", "yes",
                   "no verdict"]
    assert mr.verdict_word("not resolved (criterion: x)") == "not resolved"
    assert mr.agreement_counts(tmp_path) == {"agrees": 2, "not resolved": 2, "disagrees": 1, "no verdict": 1}
    assert mr.main(["--summary", "--figs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 of the 5 verdicts of the default run agree with the full run's, 2 are not resolved at "
                          "the default budget") and "and 1 disagree (1 without a default verdict)" in out
