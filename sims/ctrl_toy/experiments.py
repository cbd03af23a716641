"""Experiments of the CTRL toy: functions of frozen configs returning plain data (figures only plot it).

- ``prepare``: offline set, calibrated clean classifier (ECE before / after on held-out data), noisy
  classifier, CFG model, the pre-trained MLP.
- ``compare``: CTRL (+ truncated and PPO variants), classifier guidance, DPS (zeta sweep) and CFG on the same
  offline set, per label kind: accuracy / macro-F1 / confusion / log-likelihood under the true p(y|x),
  grid-histogram KL to the exact target, and a few samples for the density panels.
- ``efficiency``: KL and accuracy against the offline size, CTRL vs CFG, over seeds.
- ``gamma_sweep``: CTRL trained at gamma_train, rescaled by appendix B's mixing w = gamma / gamma_train.
- ``two_labels``: one augmented model for (y1, y2), reward log p1 + log p2.
- ``exact_check``: must-be-true (a): exact score + exact classifier + gamma = 1, learned drift vs the exact
  classifier-guidance drift.
"""
from __future__ import annotations

import time
from dataclasses import replace
from functools import lru_cache

import torch

from theory.classifiers import (
    ClassifierMLP,
    NoisyClassifierMLP,
    expected_calibration_error,
    fit_mle,
    fit_temperature,
)
from theory.guidance import CFGEps, classifier_guidance, dps_guidance, sum_fields

from . import data
from .configs import CompareConfig, EfficiencyConfig, ExactCheckConfig, GammaConfig, TwoLabelConfig
from .methods import AugmentedEps, ClassifierReward, QuantisedReward, draw, train_cfg_model, train_ctrl
from .metrics import grid_kl, label_metrics

__all__ = ["prepare", "compare", "efficiency", "gamma_sweep", "two_labels", "exact_check", "evaluate"]

N_TEST = 5000  # fresh pairs for the held-out ECE


def _training_part(cfg: CompareConfig) -> CompareConfig:
    """The fields of a CompareConfig that change trained models (the cache key of prepare / run_ctrl), so
    figures with different evaluation settings share classifiers, CFG models and CTRL runs."""
    return replace(cfg, labels=(), n_offline=0, dps_zetas=(), n_eval=0, ctrl_k=None, ppo_steps=0, seed=0)


def prepare(cfg: CompareConfig, kind: str, n_offline: int, seed: int, with_cfg: bool = True):
    """Offline set of ``n_offline`` pairs (seed), classifiers and the CFG model; ECE before / after
    temperature scaling on the held-out split and on N_TEST fresh pairs (cached per process)."""
    key = (_training_part(cfg), kind, n_offline, seed)
    if key not in _PREP or (with_cfg and _PREP[key]["cfg_model"] is None):
        _PREP[key] = _prepare(*key, with_cfg)
    return _PREP[key]


_PREP: dict = {}


def _prepare(cfg: CompareConfig, kind: str, n_offline: int, seed: int, with_cfg: bool = True):
    toy = cfg.toy
    lab = data.true_label(kind, toy)
    x, y = data.offline_set(kind, n_offline, seed, toy)
    (xt, yt), (xv, yv) = data.split(x, y, cfg.val_frac, lab.n_classes, seed)
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the MLP's initial weights: independent of what ran before in the process
    clf = ClassifierMLP(2, lab.n_classes)
    fit_mle(clf, xt, yt, replace(cfg.clf, seed=seed))
    xe, ye = data.offline_set(kind, N_TEST, 99, toy)
    def nll(xx, yy):
        return float(-clf.log_lik(xx, yy).mean())

    ece = dict(test_before=expected_calibration_error(clf(xe), ye), val_before=expected_calibration_error(clf(xv), yv),
               test_nll_before=nll(xe, ye))
    T = fit_temperature(clf, xv, yv)
    ece.update(test_after=expected_calibration_error(clf(xe), ye), val_after=expected_calibration_error(clf(xv), yv),
               test_nll_after=nll(xe, ye), temperature=T, n_val=int(yv.numel()))
    torch.manual_seed(seed)
    noisy = NoisyClassifierMLP(2, lab.n_classes)
    fit_mle(noisy, x, y, replace(cfg.noisy_clf, seed=seed), schedule=data.schedule(toy))
    t_clf = time.perf_counter() - t0
    cfgm, t_cfg = None, 0.0
    if with_cfg:
        t0 = time.perf_counter()
        cfgm = train_cfg_model(x, y, lab.n_classes, cfg.cfg.p_uncond, replace(cfg.cfg.dsm, seed=seed), toy)
        t_cfg = time.perf_counter() - t0
    return dict(label=lab, x=x, y=y, clf=clf, noisy=noisy, cfg_model=cfgm, ece=ece,
                times=dict(classifiers=t_clf, cfg_train=t_cfg))


def _fresh_ctrl(n_labels, cfg: CompareConfig, dtype=torch.float32):
    torch.manual_seed(cfg.ctrl.seed)
    return AugmentedEps(data.pretrained_mlp(cfg.toy), n_labels, hidden=cfg.ctrl.hidden, dtype=dtype)


def run_ctrl(cfg: CompareConfig, prep: dict, gamma: float | None = None, k=None, ppo: bool = False, seed: int = 0):
    """Train CTRL on the calibrated classifier of ``prep`` (cached per process on the training settings);
    returns (model, history, seconds)."""
    key = (_training_part(cfg), prep["label"].kind, int(prep["x"].shape[0]), id(prep["clf"]), gamma, k, ppo, seed)
    if key not in _CTRL:
        _CTRL[key] = _run_ctrl(cfg, prep, gamma, k, ppo, seed)
    return _CTRL[key]


_CTRL: dict = {}


def _run_ctrl(cfg: CompareConfig, prep: dict, gamma, k, ppo, seed):
    ctrl = replace(cfg.ctrl, gamma=cfg.ctrl.gamma if gamma is None else gamma, k=k, seed=seed)
    model = _fresh_ctrl(prep["label"].n_classes, cfg)
    strategy = None
    reward = ClassifierReward(prep["clf"])
    if ppo:
        from theory.engine import DDPO

        strategy, reward = DDPO(), QuantisedReward(prep["clf"])
    t0 = time.perf_counter()
    hist = train_ctrl(model, reward, ctrl, cfg.toy, strategy=strategy)
    return model, hist, time.perf_counter() - t0


def evaluate(samples: dict, lab, gamma: float, cfg: CompareConfig, keep: int = 0) -> dict:
    """Label metrics under the true p(y|x) and the per-class KL to the exact target p(y|x)^gamma p(x)."""
    out = label_metrics(samples, lab.log_prob)
    kls = {}
    for c, x in samples.items():
        u, d = data.exact_target(lambda p, c=c: lab.log_prob(p)[:, c], gamma, cfg.toy)
        kls[int(c)] = grid_kl(x, u, d, cfg.toy.hist_bins)
    out["kl_per_class"] = kls
    out["kl"] = sum(kls.values()) / len(kls)
    if keep:
        out["samples"] = {int(c): x[:keep].double().tolist() for c, x in samples.items()}
    return out


def _floor(lab, gamma, cfg, n, keep=0):
    g = torch.Generator().manual_seed(7)
    samples = {}
    for c in range(lab.n_classes):
        u, d = data.exact_target(lambda p, c=c: lab.log_prob(p)[:, c], gamma, cfg.toy)
        samples[c] = data.sample_target(u, d, n, g)
    return evaluate(samples, lab, gamma, cfg, keep)


def _per_class(fn, n_classes):
    return {c: fn(c) for c in range(n_classes)}


@lru_cache(maxsize=4)
def compare(cfg: CompareConfig) -> dict:
    """Figures 1-2: every method on one offline set per label kind (see module docstring)."""
    toy, gamma, n = cfg.toy, cfg.ctrl.gamma, cfg.n_eval
    base = data.pretrained_mlp(toy)
    sch = data.schedule(toy)
    res = {}
    for li, kind in enumerate(cfg.labels):
        prep = prepare(cfg, kind, cfg.n_offline, cfg.seed)
        lab, clf, noisy, K = prep["label"], prep["clf"], prep["noisy"], prep["label"].n_classes
        keep = 400
        methods, times = {}, dict(prep["times"])
        methods["exact target (floor)"] = _floor(lab, gamma, cfg, n, keep)
        model, hist, times["ctrl_train"] = run_ctrl(cfg, prep, seed=cfg.seed)
        methods["CTRL"] = evaluate(_per_class(lambda c: draw(model, c, n, c, toy), K), lab, gamma, cfg, keep)
        methods["CTRL"]["history"] = {k: v for k, v in _hist(hist).items()}
        if kind == cfg.labels[0] and cfg.ctrl_k is not None:
            m_k, _, times["ctrl_k_train"] = run_ctrl(cfg, prep, k=cfg.ctrl_k, seed=cfg.seed)
            methods[f"CTRL (last {cfg.ctrl_k} steps)"] = evaluate(
                _per_class(lambda c: draw(m_k, c, n, c, toy), K), lab, gamma, cfg)
        if kind == cfg.labels[0] and cfg.ppo_steps:
            try:
                m_p, h_p, times["ctrl_ppo_train"] = run_ctrl(replace(cfg, ctrl=replace(cfg.ctrl, steps=cfg.ppo_steps)),
                                                             prep, ppo=True, seed=cfg.seed)
                methods["CTRL-PPO (quantised label)"] = evaluate(
                    _per_class(lambda c: draw(m_p, c, n, c, toy), K), lab, gamma, cfg)
                methods["CTRL-PPO (quantised label)"]["history"] = _hist(h_p)
            except Exception as e:  # reported, not hidden: the PPO route depends on the engine's DDPO
                methods["CTRL-PPO (quantised label)"] = dict(error=f"{type(e).__name__}: {e}")
        methods["classifier guidance"] = evaluate(_per_class(
            lambda c: draw(base, None, n, c, toy, guidance=classifier_guidance(noisy, torch.full((n,), c), gamma)), K),
            lab, gamma, cfg, keep)
        dps = {}
        for z in cfg.dps_zetas:
            dps[z] = evaluate(_per_class(lambda c: draw(base, None, n, c, toy, guidance=dps_guidance(
                base, sch, clf.log_lik, torch.full((n,), c), z)), K), lab, gamma, cfg, keep)
        best = min(dps, key=lambda z: dps[z]["kl"])
        methods["DPS"] = dict(dps[best], zeta=best)
        methods["DPS sweep"] = {str(z): {k: v for k, v in m.items() if k != "samples"} for z, m in dps.items()}
        cfgm = CFGEps(prep["cfg_model"], gamma)
        methods["CFG"] = evaluate(_per_class(lambda c: draw(cfgm, c, n, c, toy), K), lab, gamma, cfg, keep)
        if kind == "component":  # reference: the exact noisy classifier on the same MLP base (what any method can reach)
            methods["exact classifier guidance (reference)"] = evaluate(_per_class(
                lambda c: draw(base, None, n, c, toy, guidance=classifier_guidance(
                    lambda x, t: lab.log_prob(x, t), torch.full((n,), c), gamma)), K), lab, gamma, cfg)
        methods["pre-trained"] = evaluate(_per_class(lambda c: draw(base, None, n, c, toy), K), lab, gamma, cfg)
        res[kind] = dict(methods=methods, ece=prep["ece"], times=times, n_classes=K)
    return dict(labels=res, gamma=gamma, n_offline=cfg.n_offline)


def _hist(hist) -> dict:
    a = hist.as_arrays() if hasattr(hist, "as_arrays") else hist
    return {k: [float(v) for v in a[k]] for k in ("reward_mean", "kl", "loss") if k in a}


def efficiency(cfg: EfficiencyConfig) -> dict:
    """Figure 3: for each offline size and seed, CTRL and CFG trained on the same pairs; KL to the exact
    target and accuracy (label ``cfg.base.labels[0]``, gamma = cfg.base.ctrl.gamma)."""
    base_cfg = cfg.base
    kind = base_cfg.labels[0]
    gamma, n, toy = base_cfg.ctrl.gamma, base_cfg.n_eval, base_cfg.toy
    rows = []
    for size in cfg.sizes:
        for seed in cfg.seeds:
            prep = prepare(base_cfg, kind, size, seed)
            lab, K = prep["label"], prep["label"].n_classes
            model, _, t_ctrl = run_ctrl(base_cfg, prep, seed=seed)
            e_ctrl = evaluate(_per_class(lambda c: draw(model, c, n, 100 * seed + c, toy), K), lab, gamma, base_cfg)
            cfgm = CFGEps(prep["cfg_model"], gamma)
            e_cfg = evaluate(_per_class(lambda c: draw(cfgm, c, n, 100 * seed + c, toy), K), lab, gamma, base_cfg)
            rows.append(dict(size=size, seed=seed, ctrl_kl=e_ctrl["kl"], cfg_kl=e_cfg["kl"],
                             ctrl_acc=e_ctrl["accuracy"], cfg_acc=e_cfg["accuracy"], ctrl_f1=e_ctrl["macro_f1"],
                             cfg_f1=e_cfg["macro_f1"], ece=prep["ece"], t_ctrl=t_ctrl,
                             t_cfg=prep["times"]["cfg_train"]))
    floor = _floor(data.true_label(kind, toy), gamma, base_cfg, n)
    return dict(rows=rows, kl_floor=floor["kl"], label=kind, gamma=gamma, sizes=list(cfg.sizes), seeds=list(cfg.seeds))


def gamma_sweep(cfg: GammaConfig) -> dict:
    """Figure 4: CTRL trained once at gamma_train = cfg.base.ctrl.gamma, sampled with eps_null +
    w (eps_y - eps_null), w = gamma / gamma_train, for each gamma; KL to the exact p(y|x)^gamma p(x) and
    label log-likelihood; CFG with the same w for comparison."""
    b = cfg.base
    kind, toy, n, g0 = b.labels[0], b.toy, b.n_eval, b.ctrl.gamma
    prep = prepare(b, kind, b.n_offline, b.seed)
    lab, K = prep["label"], prep["label"].n_classes
    model, _, t_train = run_ctrl(b, prep, seed=b.seed)
    rows = []
    for gm in cfg.gammas:
        w = gm / g0
        e = evaluate(_per_class(lambda c: draw(model.cfg(w), c, n, c, toy), K), lab, gm, b, keep=300)
        e_cfg = evaluate(_per_class(lambda c: draw(CFGEps(prep["cfg_model"], gm), c, n, c, toy), K), lab, gm, b)
        fl = _floor(lab, gm, b, n)
        rows.append(dict(gamma=gm, w=w, ctrl_kl=e["kl"], ctrl_loglik=e["log_lik"], ctrl_acc=e["accuracy"],
                         cfg_kl=e_cfg["kl"], cfg_loglik=e_cfg["log_lik"], floor_kl=fl["kl"],
                         floor_loglik=fl["log_lik"], samples=e["samples"]))
    return dict(rows=rows, label=kind, gamma_train=g0, train_seconds=t_train)


def two_labels(cfg: TwoLabelConfig) -> dict:
    """Figure 5: y1 (labels[0]) and y2 (labels[1]) at once; one augmented model with two conditions, reward
    log p1(y1|x0) + log p2(y2|x0) from two calibrated classifiers; target p(y1|x) p(y2|x) p(x) (gamma = 1)."""
    b = cfg.base
    toy, n, gamma = b.toy, b.n_eval, b.ctrl.gamma
    (k1, k2) = b.labels[:2]
    p1 = prepare(b, k1, b.n_offline, b.seed, with_cfg=False)
    p2 = prepare(b, k2, b.n_offline, b.seed + 1, with_cfg=False)
    l1, l2 = p1["label"], p2["label"]
    model = _fresh_ctrl((l1.n_classes, l2.n_classes), b)
    t0 = time.perf_counter()
    train_ctrl(model, ClassifierReward(p1["clf"], p2["clf"]), b.ctrl, toy)
    t_train = time.perf_counter() - t0
    base = data.pretrained_mlp(toy)
    rows = []
    for c1 in range(l1.n_classes):
        for c2 in range(l2.n_classes):
            seed = 10 * c1 + c2

            def ll(p, c1=c1, c2=c2):
                return l1.log_prob(p)[:, c1] + l2.log_prob(p)[:, c2]

            u, d = data.exact_target(ll, gamma, toy)
            xs = {"CTRL (two labels)": draw(model, (c1, c2), n, seed, toy),
                  "classifier guidance (sum)": draw(base, None, n, seed, toy, guidance=sum_fields(
                      classifier_guidance(p1["noisy"], torch.full((n,), c1), gamma),
                      classifier_guidance(p2["noisy"], torch.full((n,), c2), gamma)))}
            row = dict(y1=c1, y2=c2, kl={}, acc1={}, acc2={}, acc_joint={}, samples={})
            for name, x in xs.items():
                row["kl"][name] = grid_kl(x, u, d, toy.hist_bins)
                ok1 = l1.log_prob(x.double()).argmax(-1) == c1
                ok2 = l2.log_prob(x.double()).argmax(-1) == c2
                row["acc1"][name] = float(ok1.double().mean())
                row["acc2"][name] = float(ok2.double().mean())
                row["acc_joint"][name] = float((ok1 & ok2).double().mean())
                row["samples"][name] = x[:300].double().tolist()
            xf = data.sample_target(u, d, n, torch.Generator().manual_seed(seed))
            row["kl"]["exact target (floor)"] = grid_kl(xf, u, d, toy.hist_bins)
            rows.append(row)
    return dict(rows=rows, labels=[k1, k2], train_seconds=t_train)


def exact_check(cfg: ExactCheckConfig) -> dict:
    """Must-be-true (a): base = exact mixture eps (float64), reward = exact log p(y | x0), gamma = 1. The
    optimal added score is the exact classifier-guidance field grad log p(y | x_t) (CTRL Lemma 2, docs/theory.md §4).
    Drift error: on states of the exactly guided process for label ``cfg.label``, at every grid time,
    delta = learned score correction -(eps_aug - eps_pre)/sigma vs delta* = grad log p(y|x_t);
    rel_err = sqrt( sum_t beta_t dt E|delta - delta*|^2 / sum_t beta_t dt E|delta*|^2 ) (the Girsanov weighting
    of the path KL). Also the KL of CTRL samples to the exact target (component ``label``)."""
    toy = cfg.toy
    law = data.law(toy)
    lab = data.true_label("component", toy)
    torch.manual_seed(cfg.ctrl.seed)
    model = AugmentedEps(law, lab.n_classes, hidden=cfg.ctrl.hidden, dtype=torch.float64)
    t0 = time.perf_counter()
    hist = train_ctrl(model, ClassifierReward(lab.log_prob), replace(cfg.ctrl, gamma=1.0), toy)
    t_train = time.perf_counter() - t0
    return dict(drift_error(model, law, lab, cfg), train_seconds=t_train, history=_hist(hist))


def drift_error(model, law, lab, cfg: ExactCheckConfig) -> dict:
    """Drift errors of a CTRL model trained on the exact mixture, on states of the exactly guided process on
    the training grid (DDIM eta = 1, ``cfg.ctrl.n_steps`` steps), label ``cfg.label``:

    - ``rel_drift_error``: against the continuous optimum, the classifier-guidance score grad log p(y | x_t)
      (CTRL Lemma 2), Girsanov-weighted (beta_t dt) relative L2 over the path;
    - ``rel_drift_error_discrete``: against the optimum of the DISCRETE problem the engine solves. Its optimal
      kernel is N(x_s; m, c^2) h_s(x_s)/h_t; with log h_s linear over the step's std c that is a mean shift
      c^2 grad log h_s(m), i.e. the score correction
          delta_disc = c^2 grad log p(y | X_s = m) / (a_s sigma_t^2 / a_t - sigma_t sqrt(sigma_s^2 - c^2)),
      which tends to grad log p(y|x_t) as the step shrinks but is smaller on the late steps, where the
      DDPM step's variance c^2 << beta h (c^2 = sigma_s^2/sigma_t^2 (1 - a_t^2/a_s^2));
    - ``path_kl_bound`` (with its Monte Carlo standard error ``path_kl_bound_se``): the bound on the terminal
      laws. Both chains start from N(0, I) and have Gaussian kernels of the same std c_i, means m*_i (exact
      guidance) and m_i (CTRL), so by the chain rule of KL and data processing
          KL(law of x0 under exact guidance || law of x0 under CTRL) <= sum_i E_{P*} |m*_i - m_i|^2 / (2 c_i^2)
      exactly for the discrete chains (docs/theory.md §4, the discretised Girsanov KL), estimated on the states of
      the exactly guided chain. ``path_kl_bound_continuous`` = 1/2 sum_i beta_i h_i E|delta - delta*|^2 is its
      continuous-time (Girsanov) counterpart. The exactly guided chain itself is within ``kl_exact_guidance``
      (histogram KL) of the target.
    """
    from theory.solvers import replay, sample

    toy, c, n = cfg.toy, cfg.label, cfg.n_eval
    sch = data.schedule(toy)
    y = torch.full((n,), c)
    exact_field = classifier_guidance(lambda x, t: lab.log_prob(x, t), y, 1.0)
    gen = torch.Generator().manual_seed(40_000 + cfg.seed)
    ts = data.grid_times(toy, cfg.ctrl.n_steps)
    traj = sample(law, sch, torch.randn(n, 2, generator=gen, dtype=torch.float64), ts, method="ddim", eta=1.0,
                  guidance=exact_field, generator=gen, keep_states=True)
    num = num_d = den = den_d = 0.0
    per_t = []
    kl_steps = torch.zeros(n, dtype=torch.float64)
    xs = [x.detach() for x in traj.xs]
    with torch.no_grad():  # the three chains' transitions from the exactly guided states
        pre = replay(law, sch, xs, ts, method="ddim", eta=1.0)
        ctrl = replay(model, sch, xs, ts, method="ddim", eta=1.0, cond=y)
    star = replay(law, sch, xs, ts, method="ddim", eta=1.0, guidance=exact_field)
    for i in range(len(ts) - 1):
        x, t, s_ = xs[i], ts[i].expand(n), ts[i + 1].expand(n)
        with torch.no_grad():
            delta = -model.correction(x, t, y) / sch.sigma(t)[:, None]
        m, std, m_ctrl, m_star = pre.means[i], pre.stds[i], ctrl.means[i], star.means[i]
        kl_steps += ((m_star.detach() - m_ctrl) ** 2).sum(1) / (2 * std[:, 0] ** 2)
        d_star = exact_field(x, t, None)
        a_t, a_s = float(sch.alpha(t[:1])), float(sch.alpha(s_[:1]))
        sg_t, s2_s, c2 = float(sch.sigma(t[:1])), float(sch.sigma2(s_[:1])), float(std[0, 0]) ** 2
        coef = a_s * sg_t**2 / a_t - sg_t * max(s2_s - c2, 0.0) ** 0.5
        d_disc = c2 * exact_field(m, s_, None) / coef
        w = float(sch.beta(ts[i:i + 1])) * float(ts[i] - ts[i + 1])
        e2, s2 = float(((delta - d_star) ** 2).sum(1).mean()), float((d_star**2).sum(1).mean())
        e2d, s2d = float(((delta - d_disc) ** 2).sum(1).mean()), float((d_disc**2).sum(1).mean())
        num, den, num_d, den_d = num + w * e2, den + w * s2, num_d + w * e2d, den_d + w * s2d
        per_t.append(dict(t=float(ts[i]), rel_err=(e2 / max(s2, 1e-300)) ** 0.5,
                          rel_err_discrete=(e2d / max(s2d, 1e-300)) ** 0.5, shrink=(s2d / max(s2, 1e-300)) ** 0.5))
    xs_ctrl = draw(model, c, n, 1, toy, dtype=torch.float64)
    u, d = data.exact_target(lambda p: lab.log_prob(p)[:, c], 1.0, toy)
    xf = data.sample_target(u, d, n, torch.Generator().manual_seed(3))
    return dict(rel_drift_error=(num / den) ** 0.5, rel_drift_error_discrete=(num_d / den_d) ** 0.5, per_t=per_t,
                path_kl_bound=float(kl_steps.mean()), path_kl_bound_se=float(kl_steps.std() / n**0.5),
                path_kl_bound_continuous=0.5 * num,
                kl_ctrl=grid_kl(xs_ctrl, u, d, toy.hist_bins), kl_exact_guidance=grid_kl(traj.x0.detach(), u, d, toy.hist_bins),
                kl_floor=grid_kl(xf, u, d, toy.hist_bins), n_eval=n)
