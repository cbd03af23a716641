"""Verdicts of the claims figures on the papers' claims, computed from each figure's JSON data
(``theory.registry.figure(verdicts=...)``; helpers and standard errors of ``theory.verdicts``)."""
from __future__ import annotations

from sims.gradguide.verdicts import CLAIM_SPHERE, ON_SPHERE, dominance
from theory.verdicts import Z, by_condition, mean_se, num, pm, side, verdict

CLAIM_TRADE = ("Gradient guidance (Guo et al.), sphere: G_loss's extra reward over G comes with more off-sphere "
               "distance (the learned-score finding of gg_sphere), checked with the exact score")
CLAIM_DIM = "DRaFT (Clark et al.): gradient methods (DRaFT-1, DRaFT-LV) need fewer reward queries than DDPO"


def sphere(data: dict) -> list[dict]:
    """claims_sphere: the stored trade-off verdicts (exact and learned score, from ``sphere_exact.verdict``)
    and the front dominance of ``sims.gradguide.verdicts.dominance`` with the exact score (1 seed: se over the
    batch's samples)."""
    ex, le = data["exact"], data["learned"]
    deltas = data["config"]["deltas"]
    floor = float(ex["pretrained"]["dev_abs"])
    ok, words = dominance(ex["final"], deltas, floor, int(data["config"]["n"]),
                          float(ex["pretrained"].get("dev_abs_sd", "nan")))
    return [verdict(CLAIM_TRADE, f"{ex['verdict']} with the exact score (criterion: reward gain >= 0.5 % and "
                                 f"off-sphere ratio >= 1.05); learned score: {le['verdict']}",
                    f"exact score: {ex['numbers']}; learned score: {le['numbers']} (1 seed, batch means, no se)",
                    data["regime"], data["budget"]),
            verdict(CLAIM_SPHERE, by_condition(ok, "delta") + f" with the exact score (criterion: G's reward not above "
                    f"G_loss's by {num(Z)} se, G_loss's distance not above G's or {num(ON_SPHERE)}x the unguided "
                    f"sampler's {num(floor)} by {num(Z)} se)",
                    "G_loss vs G, exact score, " + "; ".join(words) + " (1 seed, batch means, se over the samples)",
                    data["regime"], data["budget"])]


def dimension(data: dict) -> list[dict]:
    """claims_dimension: per D, the per-seed ratio DDPO queries / best gradient method's queries (each at
    its best learning rate; a target not reached counts as twice the budget, as in the table's score),
    above 1 beyond Z se ("not resolved" when no D is beyond Z se either way, ``side``)."""
    budget = float(data["config"]["budget"])
    ok, words = {}, []
    for D in [str(d) for d in data["config"]["dims"]]:
        rows = {m: data["table"][m][D] for m in data["table"]}
        grad = min((m for m in rows if m != "DDPO"), key=lambda m: float(rows[m]["score"]))
        q = {m: [2 * budget if x is None else float(x) for x in rows[m]["queries_per_seed"]] for m in ("DDPO", grad)}
        m, se, n = mean_se(a / b for a, b in zip(q["DDPO"], q[grad]))
        ok[D] = side(m - 1.0, se)
        words.append(f"D={D}: DDPO / {grad} {pm(m, se, n, suffix='x')}"
                     + ("" if rows["DDPO"]["reached_all"] else " (DDPO missed the target in a seed)"))
    return [verdict(CLAIM_DIM, f"{by_condition(ok, 'D')} (criterion: DDPO needs more queries than the best gradient "
                               f"method, per seed, by {num(Z)} se; not resolved when within {num(Z)} se either way)",
                    "; ".join(words) + f"; crossings {data.get('crossings')}", data["regime"], data["budget"])]
