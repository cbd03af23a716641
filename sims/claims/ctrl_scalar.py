"""CTRL against classifier-free guidance when the label is a simple function of a complex x.

The CTRL paper's argument for learning p(y | x) instead of p(x | y): when y is a simple function of a complex x
(the compressibility of an image), a classifier is easy to learn from a few labelled pairs while the
conditional density is as hard as the data law itself; CTRL borrows the data law from the pre-trained model
and learns only the classifier. The CTRL toy (``sims.ctrl_toy``) labels mixture components, where p(x | y)
is one Gaussian, as simple as the classifier. This module sets the two regimes side by side:

- ``scalar``: an n x n grid of isotropic Gaussians (``grid_law``, 25 components, docs/theory.md (5.1)) and
  y = the first coordinate x_1 quantised into n bins (edges midway between the columns) with a logistic edge
  of width ``edge_width`` (``QuantisedLabel``): the toy analogue of compressibility classes. The classifier
  is a threshold on one coordinate; each conditional p(x | y) is a column of n separated modes;
- ``component``: the CTRL toy's 4-mode ring with y = mixture component (``sims.ctrl_toy.data``).

In both the pre-trained model is the EXACT mixture eps (docs/theory.md (5.3)), the CTRL paper's situation
of a pre-trained model fitted to plentiful unlabelled data. For each offline size N and seed, both methods
see the same N pairs (x, y ~ p(y | x)):

- CTRL: a classifier p_phi(y | x) fitted by (6.6) on 3/4 of the pairs, calibrated by (6.7) on the rest,
  then the augmented model (6.10b) fine-tuned on r = log p_phi(y | x0), lam = 1/gamma (6.9) by
  ``sims.ctrl_toy.methods.train_ctrl`` (the engine);
- CFG: a conditional EpsMLP trained by denoising score matching on the N pairs (label dropout), sampled by
  (6.3) with w = gamma (``sims.ctrl_toy.methods.train_cfg_model``).

Metric: the histogram KL (``sims.grid2d.grid_kl``) of each method's samples to the exact target
p_gamma(x | y) ∝ p(y | x)^gamma p(x) (docs/theory.md (4.1), Theorem 1 of §6.5), normalised by quadrature on
a regular grid (5.10); at gamma = 1 it is p(x | y), CFG's target as well. Label accuracy: the fraction of
samples whose true label (the bin of |x|, resp. the most probable component) is the requested one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch

from sims.ctrl_toy import data as toy_data
from sims.ctrl_toy.configs import CFGConfig, CTRLConfig, ToyConfig
from sims.ctrl_toy.methods import AugmentedEps, draw, train_cfg_model, train_ctrl
from sims.ctrl_toy.metrics import label_metrics
from sims.grid2d import grid_kl, sample_target
from theory.classifiers import ClassifierMLP, ClassifierReward, FitConfig, fit_mle, fit_temperature
from theory.exact import GaussianMixture
from theory.guidance import CFGEps
from theory.nets import DSMConfig
from theory.progress import report
from theory.registry import figure
from theory.verdicts import Z

__all__ = ["ScalarConfig", "quick_config", "grid_law", "column_edges", "QuantisedLabel", "Setting", "setting",
           "grid_target", "offline_pairs", "floor", "run_cell", "sweep", "summarise", "verdicts", "draw_figure",
           "fig_ctrl_scalar", "SETTINGS", "CLAIM"]

SETTINGS = ("scalar", "component")


@dataclass(frozen=True)
class ScalarConfig:
    """The grid law and its quantised-coordinate label, the shared toy settings (schedule, samplers, grid,
    CFG network), the training budgets of both methods and the sweep."""

    n_side: int = 5  # n_side x n_side isotropic Gaussians; y = the column (n_side classes)
    spacing: float = 1.2
    comp_std: float = 0.3
    edge_width: float = 0.15
    toy: ToyConfig = ToyConfig()  # schedule, sampler steps, grid, CFG network size; the 'component' law
    clf: FitConfig = FitConfig(steps=1000, batch_size=256, lr=3e-3)
    ctrl: CTRLConfig = CTRLConfig(steps=300, batch_size=64, n_steps=20)
    cfg: CFGConfig = CFGConfig(dsm=DSMConfig(steps=1500, batch_size=256, lr=2e-3, t_min=1e-3, seed=0))
    val_frac: float = 0.25
    n_eval: int = 1000  # samples per class
    sizes: tuple = (25, 50, 100, 250, 500, 1000, 2500, 5000)  # the scalar setting's offline sizes
    component_sizes: tuple = (25, 250, 2500)  # the component setting's (the known regime: fewer sizes)
    seeds: tuple = (0, 1, 2)
    settings: tuple = SETTINGS
    z_win: float = 2.0  # a method "wins" at N when its KL is lower by more than z_win standard errors

    def __post_init__(self):
        if not 3 <= self.n_side <= 7:
            raise ValueError(f"n_side: the grid needs 3..7 columns (one class each), got {self.n_side}")
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad:
            raise ValueError(f"settings: unknown {bad}, use a subset of {SETTINGS}")
        for name in ("sizes", "component_sizes"):
            if any(int(n) < 2 * self.n_side for n in getattr(self, name)):
                raise ValueError(f"{name}: every offline size must be >= {2 * self.n_side} (2 pairs per class)")


def quick_config() -> ScalarConfig:
    """The reduced settings of ``diffsteer figures`` (about a minute on one thread): N in {25, 2500} (scalar)
    and {25} (component), 2 seeds, smaller budgets for every learner."""
    return ScalarConfig(sizes=(25, 2500), component_sizes=(25,), seeds=(0, 1), n_eval=300,
                        clf=FitConfig(steps=500, batch_size=256, lr=3e-3),
                        ctrl=CTRLConfig(steps=120, batch_size=64, n_steps=15),
                        cfg=CFGConfig(dsm=DSMConfig(steps=800, batch_size=256, lr=2e-3, t_min=1e-3, seed=0)))


# --- the scalar setting: a grid of Gaussians, y = the quantised first coordinate ------------------------------

def grid_law(cfg: ScalarConfig = ScalarConfig()) -> GaussianMixture:
    """p(x) = (1/n^2) sum_{i,j} N((s (i - (n-1)/2), s (j - (n-1)/2)), sd^2 I): an n x n grid of equal
    isotropic Gaussians (docs/theory.md (5.1)) with the toy's VP schedule (so it is also the exact eps model)."""
    n = cfg.n_side
    g = cfg.spacing * (torch.arange(n, dtype=torch.float64) - (n - 1) / 2)
    X, Y = torch.meshgrid(g, g, indexing="xy")
    means = torch.stack([X.flatten(), Y.flatten()], 1)
    K = n * n
    covs = cfg.comp_std**2 * torch.eye(2, dtype=torch.float64).expand(K, 2, 2).clone()
    return GaussianMixture(torch.full((K,), 1.0 / K, dtype=torch.float64), means, covs,
                           schedule=toy_data.schedule(cfg.toy))


def column_edges(cfg: ScalarConfig = ScalarConfig()) -> torch.Tensor:
    """The n_side - 1 bin edges of x_1, midway between the grid's columns (class c = column c)."""
    n = cfg.n_side
    return cfg.spacing * (torch.arange(1, n, dtype=torch.float64) - n / 2)


class QuantisedLabel:
    """y = the bin of a scalar measure r(x) (``measure``: 'x1', the first coordinate, or 'radius', |x|) among
    ``edges``, with logistic edges of width w (an ordinal logistic law):

        p(y = c | x) = sigmoid((r - e_c) / w) - sigmoid((r - e_{c+1}) / w),   e_0 = -inf, e_C = +inf,

    a telescoping sum, so it sums to 1 over c; computed in log space as
    log sigmoid(a) + log sigmoid(-b) + log(1 - exp(b - a)) with a = (r - e_c)/w > b = (r - e_{c+1})/w
    (sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^(b - a)))."""

    def __init__(self, edges: torch.Tensor, width: float, measure: str = "x1"):
        if measure not in ("x1", "radius"):
            raise ValueError(f"measure: 'x1' or 'radius', got {measure!r}")
        self.kind = measure
        edges = torch.as_tensor(edges, dtype=torch.float64)
        if edges.ndim != 1 or edges.numel() < 1 or not bool((edges[1:] > edges[:-1]).all()):
            raise ValueError(f"edges: need an increasing 1-D tensor of bin edges, got {edges}")
        if not width > 0:
            raise ValueError(f"width: the logistic edge width must be > 0, got {width}")
        self.edges, self.width = edges, float(width)
        self.n_classes = edges.numel() + 1

    def measure(self, x: torch.Tensor) -> torch.Tensor:
        """The scalar measure r(x): x_1 or |x|."""
        x = x.to(torch.float64)
        return x[:, 0] if self.kind == "x1" else x.norm(dim=-1)

    def quantise(self, x: torch.Tensor) -> torch.Tensor:
        """The hard label: the bin of r(x) (the argmax of p(y | x) when every bin is wider than ~2 w)."""
        return torch.bucketize(self.measure(x).contiguous(), self.edges)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(y = c | x), shape (B, n_classes)."""
        r = self.measure(x)
        z = (r[:, None] - self.edges[None]) / self.width  # (B, C - 1): a for class c is z[:, c - 1]
        ls = torch.nn.functional.logsigmoid
        cols = [ls(-z[:, 0])]
        for c in range(1, self.n_classes - 1):
            gap = float(self.edges[c] - self.edges[c - 1]) / self.width
            cols.append(ls(z[:, c - 1]) + ls(-z[:, c]) + math.log1p(-math.exp(-gap)))
        cols.append(ls(z[:, -1]))
        return torch.stack(cols, -1)

    def __call__(self, x, t=None):
        if t is not None:
            raise ValueError("t: the quantised label's likelihood is known on clean x only")
        return self.log_prob(x)

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """y ~ p(y | x), shape (B,)."""
        return torch.multinomial(self.log_prob(x).exp(), 1, generator=generator).squeeze(-1)


# --- the two settings behind one interface ------------------------------------------------------------------

@dataclass
class Setting:
    """A data law with its exact eps (``law``), a label with a known likelihood ``log_prob(x) -> (B, C)``
    and a sampler ``label_sample(x, k, generator)`` (k: the components that drew x)."""

    name: str
    law: GaussianMixture
    log_prob: object
    n_classes: int
    label_sample: object
    description: str = ""
    extra: dict = field(default_factory=dict)


def setting(name: str, cfg: ScalarConfig = ScalarConfig()) -> Setting:
    if name == "scalar":
        lab = QuantisedLabel(column_edges(cfg), cfg.edge_width)
        n = cfg.n_side
        return Setting("scalar", grid_law(cfg), lab.log_prob, lab.n_classes, lambda x, k, g: lab.sample(x, g),
                       f"{n} x {n} grid of Gaussians (spacing {cfg.spacing}, std {cfg.comp_std}), y = x_1 in "
                       f"{lab.n_classes} bins (edges {[round(float(e), 3) for e in lab.edges]}, logistic width "
                       f"{cfg.edge_width})")
    if name == "component":
        toy = cfg.toy
        lab = toy_data.true_label("component", toy)
        return Setting("component", lab.law, lambda x: lab.log_prob(x), lab.n_classes, lambda x, k, g: k,
                       f"ring of {toy.n_modes} Gaussians (radius {toy.radius}, std {toy.mode_std}, weights "
                       f"{list(toy.weights)}), y = mixture component")
    raise ValueError(f"name: unknown setting {name!r}, use one of {SETTINGS}")


@lru_cache(maxsize=8)
def _grid(cfg: ScalarConfig, name: str):
    toy = cfg.toy
    u = torch.linspace(-toy.grid_lim, toy.grid_lim, toy.grid_n, dtype=torch.float64)
    X, Y = torch.meshgrid(u, u, indexing="xy")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)
    st = setting(name, cfg)
    return u, st.law.log_prob(pts, 0.0), st.log_prob(pts)


def grid_target(cfg: ScalarConfig, name: str, label: int, gamma: float = 1.0):
    """The exact target p_gamma(x | y) ∝ p(y | x)^gamma p(x) (docs/theory.md (4.1), (5.10)) on the toy's
    regular grid over [-L, L]^2: (u (n,), density (n, n) indexed [iy, ix], sum * du^2 = 1), and its
    normaliser Z_y = int p(y | x)^gamma p(x) dx by the same quadrature (the class mass at gamma = 1)."""
    gamma = toy_data.check_gamma(gamma)
    u, logp, lab = _grid(cfg, name)
    if not 0 <= int(label) < lab.shape[1]:
        raise ValueError(f"label: must be in [0, {lab.shape[1]}), got {label}")
    lt = logp + gamma * lab[:, int(label)]
    du = float(u[1] - u[0])
    log_z = float(torch.logsumexp(lt, 0)) + 2 * math.log(du)
    n = u.numel()
    return u, (torch.softmax(lt, 0) / du**2).reshape(n, n), math.exp(log_z)


def offline_pairs(st: Setting, n: int, seed: int):
    """n pairs x ~ p(x), y ~ p(y | x), drawn again (same stream) until every class has >= 2 pairs, so the
    stratified split leaves each class on both sides (the classifier's calibration needs all classes)."""
    g = torch.Generator().manual_seed(50_000 + seed)
    for _ in range(1000):
        x, k = st.law.sample(n, generator=g, return_components=True)
        y = st.label_sample(x, k, g)
        if int(torch.bincount(y, minlength=st.n_classes).min()) >= 2:
            return x.float(), y
    raise ValueError(f"n: {n} pairs rarely hold >= 2 of every one of {st.n_classes} classes; use a larger offline size")


# --- one cell of the sweep -----------------------------------------------------------------------------------

def _float32(law: GaussianMixture) -> GaussianMixture:
    """The exact eps model in float32 (the samplers' dtype; about 3x faster than float64 on CPU here)."""
    return GaussianMixture(law.weights.float(), law.means.float(), law.covs.float(), schedule=law.schedule,
                           labels=law.labels, dtype=torch.float32)


def _evaluate(cfg: ScalarConfig, st: Setting, samples: dict, gamma: float) -> dict:
    out = label_metrics(samples, st.log_prob)
    kls = {}
    for c, x in samples.items():
        u, d, _ = grid_target(cfg, st.name, c, gamma)
        kls[int(c)] = grid_kl(x, u, d, cfg.toy.hist_bins)
    return dict(kl=sum(kls.values()) / len(kls), kl_per_class=kls, accuracy=out["accuracy"],
                macro_f1=out["macro_f1"], log_lik=out["log_lik"])


def floor(cfg: ScalarConfig, name: str, gamma: float = 1.0, seed: int = 7) -> dict:
    """The metrics of n_eval exact-target samples per class (what a perfect sampler would score)."""
    st = setting(name, cfg)
    g = torch.Generator().manual_seed(seed)
    samples = {}
    for c in range(st.n_classes):
        u, d, _ = grid_target(cfg, name, c, gamma)
        samples[c] = sample_target(u, d, cfg.n_eval, g)
    return _evaluate(cfg, st, samples, gamma)


def _optimum_samples(cfg: ScalarConfig, name: str, clf, c: int, gamma: float, g: torch.Generator) -> torch.Tensor:
    """n_eval exact samples of CTRL's optimum with the learned classifier, p_phi(y | x)^gamma p(x) (Theorem 1,
    docs/theory.md §6.5; the initial-value bias (4.10) is negligible at alpha(1) ~ 0.007), drawn on the grid:
    what CTRL would reach with this classifier at convergence."""
    u, logp, _ = _grid(cfg, name)
    n = u.numel()
    X, Y = torch.meshgrid(u, u, indexing="xy")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)
    with torch.no_grad():
        lc = clf(pts.float()).double()[:, c]
    du = float(u[1] - u[0])
    dens = (torch.softmax(logp + gamma * lc, 0) / du**2).reshape(n, n)
    return sample_target(u, dens, cfg.n_eval, g)


def run_cell(cfg: ScalarConfig, name: str, n: int, seed: int) -> dict:
    """CTRL and CFG on the same n offline pairs (seed): KL to the exact target and accuracy, with wall times;
    and CTRL's optimum with its classifier (sampled exactly on the grid, no training)."""
    st = setting(name, cfg)
    gamma, toy, K = cfg.ctrl.gamma, cfg.toy, st.n_classes
    x, y = offline_pairs(st, n, seed)
    (xt, yt), (xv, yv) = toy_data.split(x, y, cfg.val_frac, K, seed)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    clf = ClassifierMLP(2, K)
    fit_mle(clf, xt, yt, replace(cfg.clf, seed=seed))
    temp = fit_temperature(clf, xv, yv)
    torch.manual_seed(1000 + seed)
    model = AugmentedEps(_float32(st.law), K, hidden=cfg.ctrl.hidden)
    train_ctrl(model, ClassifierReward(clf), replace(cfg.ctrl, seed=seed), toy)
    t_ctrl = time.perf_counter() - t0
    t0 = time.perf_counter()
    cfgm = train_cfg_model(x, y, K, cfg.cfg.p_uncond, replace(cfg.cfg.dsm, seed=seed), toy)
    t_cfg = time.perf_counter() - t0
    xe = st.law.sample(4000, generator=torch.Generator().manual_seed(60_000))
    with torch.no_grad():  # the classifier's accuracy against the true most probable label, on fresh x ~ p(x)
        clf_acc = float((clf(xe.float()).argmax(-1) == st.log_prob(xe).argmax(-1)).double().mean())
    n_ev = cfg.n_eval
    s_ctrl = {c: draw(model, c, n_ev, 100 * seed + c, toy) for c in range(K)}
    s_cfg = {c: draw(CFGEps(cfgm, gamma), c, n_ev, 100 * seed + c, toy) for c in range(K)}
    g = torch.Generator().manual_seed(70_000 + seed)
    s_opt = {c: _optimum_samples(cfg, name, clf, c, gamma, g) for c in range(K)}
    return dict(setting=name, n=n, seed=seed, ctrl=_evaluate(cfg, st, s_ctrl, gamma),
                cfg=_evaluate(cfg, st, s_cfg, gamma), ctrl_optimum=_evaluate(cfg, st, s_opt, gamma),
                temperature=temp, clf_accuracy=clf_acc, t_ctrl=t_ctrl, t_cfg=t_cfg)


def _sizes(cfg: ScalarConfig, name: str) -> tuple:
    return cfg.sizes if name == "scalar" else cfg.component_sizes


def sweep(cfg: ScalarConfig, progress=None) -> dict:
    """Every (setting, N, seed) cell, the floors, and the wall time."""
    t0 = time.perf_counter()
    cells = [(name, n, seed) for name in cfg.settings for n in _sizes(cfg, name) for seed in cfg.seeds]
    rows = []
    for i, (name, n, seed) in enumerate(cells):
        rows.append(run_cell(cfg, name, n, seed))
        if progress is not None:
            progress(i + 1, len(cells))
    floors = {name: floor(cfg, name) for name in cfg.settings}
    return dict(rows=rows, floors=floors, descriptions={name: setting(name, cfg).description for name in cfg.settings},
                wall_s=time.perf_counter() - t0)


METHODS = ("ctrl", "cfg", "ctrl_optimum")


def summarise(rows: list) -> dict:
    """{setting: {N: {method: {metric: [mean, se, n seeds]}, 'cfg_minus_ctrl_kl': [...], ...}}} over seeds,
    the differences paired by seed (same offline pairs)."""
    from theory.verdicts import mean_se

    out: dict = {}
    for r in rows:
        out.setdefault(r["setting"], {}).setdefault(str(r["n"]), []).append(r)
    summ: dict = {}
    for name, by_n in out.items():
        summ[name] = {}
        for n, rs in sorted(by_n.items(), key=lambda kv: int(kv[0])):
            e = {m: {k: list(mean_se(float(r[m][k]) for r in rs)) for k in ("kl", "accuracy")} for m in METHODS}
            e["cfg_minus_ctrl_kl"] = list(mean_se(float(r["cfg"]["kl"]) - float(r["ctrl"]["kl"]) for r in rs))
            e["ctrl_minus_cfg_accuracy"] = list(mean_se(float(r["ctrl"]["accuracy"]) - float(r["cfg"]["accuracy"])
                                                        for r in rs))
            e["cfg_minus_optimum_kl"] = list(mean_se(float(r["cfg"]["kl"]) - float(r["ctrl_optimum"]["kl"]) for r in rs))
            e["clf_accuracy"] = list(mean_se(float(r["clf_accuracy"]) for r in rs))
            e["temperature"] = list(mean_se(float(r["temperature"]) for r in rs))
            summ[name][n] = e
        del by_n
    return summ


# --- verdicts ------------------------------------------------------------------------------------------------

CLAIM = "CTRL beats classifier-free guidance at small offline sizes when y is a simple function of a complex x (CTRL paper)"


def _when(ok: dict) -> str:
    """The verdict word over offline sizes (keys: N as strings; values ``theory.verdicts.side``: True CTRL
    wins beyond Z se, False loses beyond Z se, None within), by ``theory.verdicts.condition_word``'s rule, with
    the wins named "N <= N*" (">= N*") when they are exactly the smallest (largest) sizes, else as a set."""
    from theory.verdicts import condition_word

    sizes = sorted(ok, key=int)
    w, good = condition_word({n: ok[n] for n in sizes})
    if w != "holds only when":
        return w
    if good == sizes[: len(good)]:
        return f"holds only when N <= {good[-1]}"
    if good == sizes[-len(good):]:
        return f"holds only when N >= {good[0]}"
    return f"holds only when N in {{{', '.join(good)}}}"


def _losses(ok_cfg: dict) -> str:
    bad = [n for n in sorted(ok_cfg, key=int) if ok_cfg[n]]
    return f"CFG better beyond {Z} se at N in {{{', '.join(bad)}}}" if bad else f"CFG never better beyond {Z} se"


def _budget(data: dict) -> str:
    c = data["config"]
    ct, cf, cl = c["ctrl"], c["cfg"]["dsm"], c["clf"]
    rows = data["rows"]
    t_ctrl = sum(float(r["t_ctrl"]) for r in rows) / max(len(rows), 1)
    t_cfg = sum(float(r["t_cfg"]) for r in rows) / max(len(rows), 1)
    return (f"per cell: CTRL = classifier {cl['steps']} Adam steps of {cl['batch_size']} + temperature, then "
            f"{ct['steps']} fine-tuning steps x {ct['batch_size']} samples x {ct['n_steps']} DDIM steps "
            f"({ct['steps'] * ct['batch_size']} reward queries, lr {ct['lr']}, correction MLP hidden {ct['hidden']}), "
            f"mean {t_ctrl:.1f} s; CFG = {cf['steps']} score-matching steps x {cf['batch_size']} (label dropout "
            f"{c['cfg']['p_uncond']}), mean {t_cfg:.1f} s; evaluation {c['n_eval']} samples per class, "
            f"{c['toy']['n_steps']} DDIM steps; {len(c['seeds'])} seeds; {len(rows)} cells; sweep wall "
            f"{float(data['wall_s']) / 60:.1f} min on a shared 2-core machine, one thread")


def _regime(data: dict, name: str) -> str:
    c = data["config"]
    return (f"{data['descriptions'][name]}; pre-trained model = the exact mixture eps; gamma = {c['ctrl']['gamma']} "
            f"(target p(x | y)); offline N in {list(data['summary'][name])}; metric: histogram KL "
            f"({c['toy']['hist_bins']}^2 bins) to the quadrature target, paired by seed")


def _kl_verdict(data: dict, name: str, claim: str, method: str = "ctrl") -> dict:
    from theory.verdicts import num, pm, side, verdict

    S = data["summary"][name]
    key = "cfg_minus_ctrl_kl" if method == "ctrl" else "cfg_minus_optimum_kl"
    ok, ok_cfg, words = {}, {}, []
    for n, e in S.items():
        d, se, k = e[key]
        ok[n] = side(d, se)
        ok_cfg[n] = ok[n] is False
        words.append(f"N={n}: {'CTRL' if method == 'ctrl' else 'CTRL optimum'} {pm(*e[method]['kl'])}, "
                     f"CFG {pm(*e['cfg']['kl'])}, CFG - CTRL {pm(d, se, k)}")
    fl = data["floors"][name]["kl"]
    what = "trained CTRL" if method == "ctrl" else "CTRL's optimum p_phi(y|x)^gamma p(x) with its learned classifier"
    return verdict(claim, f"{_when(ok)} ({what}; criterion: CFG's KL above CTRL's by {Z} se over seeds, not "
                          f"resolved when within {Z} se of CFG at every N; {_losses(ok_cfg)})",
                   "; ".join(words) + f"; exact-sample floor {num(fl)}", _regime(data, name), _budget(data))


def _acc_verdict(data: dict, name: str, claim: str) -> dict:
    from theory.verdicts import beyond, num, pm, side, verdict

    S = data["summary"][name]
    ok, ok_cfg, words = {}, {}, []
    for n, e in S.items():
        d, se, k = e["ctrl_minus_cfg_accuracy"]
        ok[n] = side(d, se)
        ok_cfg[n] = ok[n] is False
        words.append(f"N={n}: CTRL {pm(*e['ctrl']['accuracy'])}, CFG {pm(*e['cfg']['accuracy'])}")
    fl = float(data["floors"][name]["accuracy"])
    above = [n for n, e in S.items() if beyond(float(e["cfg"]["accuracy"][0]) - fl, float(e["cfg"]["accuracy"][1]))]
    note = (f"; CFG's accuracy is above the exact samples' ({num(fl)}) beyond {Z} se at N in {{{', '.join(above)}}}: "
            "its samples avoid the classes' soft edges, which accuracy rewards and the KL does not" if above else "")
    return verdict(claim, f"{_when(ok)} (label accuracy by the true measure; criterion: CTRL's accuracy above CFG's "
                          f"by {Z} se over seeds, not resolved when within {Z} se of CFG at every "
                          f"N; {_losses(ok_cfg)}{note})",
                   "; ".join(words) + f"; exact-sample accuracy {num(fl)}", _regime(data, name), _budget(data))


def _regime_verdict(data: dict, claim: str) -> dict:
    """At each N run in both settings: CTRL's advantage CFG KL - CTRL KL (paired by seed) in the scalar setting
    minus that in the component setting, se = sqrt(se_s^2 + se_c^2) (independent runs)."""
    from theory.verdicts import pm, side, verdict

    S, C = data["summary"]["scalar"], data["summary"]["component"]
    ok, ok_rev, words = {}, {}, []
    for n in sorted(set(S) & set(C), key=int):
        (a, sa, k), (b, sb, _) = S[n]["cfg_minus_ctrl_kl"], C[n]["cfg_minus_ctrl_kl"]
        d, se = a - b, math.hypot(sa, sb)
        ok[n] = side(d, se)
        ok_rev[n] = ok[n] is False
        words.append(f"N={n}: scalar {pm(a, sa)}, component {pm(b, sb)}, difference {pm(d, se, k)}")
    rev = [n for n in ok_rev if ok_rev[n]]
    return verdict(claim, f"{_when(ok)} (criterion: CTRL's KL advantage over CFG larger in the scalar setting by {Z} "
                          f"se, not resolved when within {Z} se at every N; "
                          + (f"smaller beyond {Z} se at N in {{{', '.join(rev)}}})" if rev else
                                     f"never smaller beyond {Z} se)"),
                   "; ".join(words), _regime(data, "scalar") + " | against: " + data["descriptions"]["component"],
                   _budget(data))


def verdicts(data: dict) -> list[dict]:
    """claims_ctrl_scalar: per setting, per N, CFG's KL minus CTRL's, paired by seed, beyond Z se (theory.verdicts);
    the label accuracy likewise; and CTRL's optimum with its learned classifier (what convergence would give)."""
    out = []
    if "scalar" in data["summary"]:
        out.append(_kl_verdict(data, "scalar", CLAIM + ": KL to the exact target"))
        out.append(_acc_verdict(data, "scalar", CLAIM + ": label accuracy"))
        out.append(_kl_verdict(data, "scalar", CLAIM + ": at CTRL's optimum with its classifier (converged)",
                               method="ctrl_optimum"))
    if "component" in data["summary"]:
        out.append(_kl_verdict(data, "component", "CTRL beats classifier-free guidance at small offline sizes (CTRL "
                                                  "paper), with component labels (p(x | y) as simple as p(y | x)): KL"))
    if {"scalar", "component"} <= set(data["summary"]) and set(data["summary"]["scalar"]) & set(data["summary"]["component"]):
        out.append(_regime_verdict(data, "CTRL's advantage over classifier-free guidance is larger when y is a simple "
                                         "function of a complex x than with component labels (CTRL paper's argument)"))
    return out


# --- figure --------------------------------------------------------------------------------------------------

COLORS = {"ctrl": "tab:red", "cfg": "tab:blue", "ctrl_optimum": "tab:red"}
LABELS = {"ctrl": "CTRL (trained)", "cfg": "CFG", "ctrl_optimum": "CTRL's optimum with its classifier"}


def draw_figure(data: dict):
    """KL to the exact target (top) and label accuracy (bottom) against N, per setting; mean +- se over seeds."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["summary"])
    all_n = [int(n) for name in names for n in data["summary"][name]]
    fig, axes = plt.subplots(2, len(names), figsize=(6.2 * len(names), 8.4), squeeze=False)
    for j, name in enumerate(names):
        S = data["summary"][name]
        ns = [int(n) for n in S]
        for i, metric in enumerate(("kl", "accuracy")):
            ax = axes[i, j]
            for m in METHODS:
                mean = [float(S[str(n)][m][metric][0]) for n in ns]
                se = [float(S[str(n)][m][metric][1]) for n in ns]
                se = [0.0 if not math.isfinite(s) else s for s in se]
                ax.errorbar(ns, mean, yerr=se, marker="o" if m != "ctrl_optimum" else "x", capsize=3,
                            ls="-" if m != "ctrl_optimum" else ":", color=COLORS[m], label=LABELS[m])
            ax.axhline(float(data["floors"][name][metric]), color="k", lw=0.8, ls="--", label="exact samples")
            ax.set_xscale("log")
            ax.set_xlim(min(all_n) / 1.5, max(all_n) * 1.5)
            if metric == "kl":
                ax.set_yscale("log")
            ax.set_xlabel("offline pairs N")
            ax.set_ylabel("histogram KL to the exact target" if metric == "kl" else "label accuracy (true measure)")
            if i == 0:
                ax.set_title(textwrap.fill(f"{name}: {data['descriptions'][name]}", 70), fontsize=8)
            ax.legend(fontsize=7)
    words = [f"{v['claim'].split(': ')[-1]}: {v['verdict'].split(' (')[0]}" for v in verdicts(data)]
    fig.suptitle(textwrap.fill(("[quick] " if data["quick"] else "") + " | ".join(words), 150), fontsize=8)
    fig.tight_layout()
    return fig


@figure("claims_ctrl_scalar", "CTRL against classifier-free guidance over the offline size N when y is a quantised "
        "scalar of a complex x (5 x 5 grid of Gaussians, y = x_1 bin), beside the component-label toy; KL to the "
        "exact target and label accuracy, 3 seeds", draw=draw_figure, verdicts=verdicts)
def fig_ctrl_scalar(quick: bool = False) -> dict:
    cfg = quick_config() if quick else ScalarConfig()
    res = sweep(cfg, progress=lambda i, n: report(i, n, "cell", "CTRL/CFG cells"))
    return {"config": cfg, "quick": quick, **res, "summary": summarise(res["rows"])}
