"""Metrics of the CTRL toy, all under the TRUE label likelihood p(y | x) (as the authors score with the real
JPEG size): per-label accuracy, macro-F1 and confusion matrix (predicted label = argmax_c p(c | x)),
mean label log-likelihood E log p(y | x), and the KL from a grid histogram of the samples to the exact target.

KL estimator (its bias stated): bins B_j of a ``bins`` x ``bins`` histogram over [-L, L]^2 (samples
outside are clamped into the edge bins), q_j = sample fraction, p_j = exact target mass of the bin;
KL_hat = sum_j q_j log(q_j / p_j) estimates KL(q_binned || p_binned) <= KL(q || p) (binning loses
information: biased LOW by the within-bin discrepancy), and the finite sample biases it HIGH by about
(m - 1) / (2 N) (m = bins with mass; Miller-Madow). We report KL_hat and the same estimator on N exact
target samples (``kl_floor``), the value a perfect sampler would get. (``grid_kl`` and ``bin_mass`` live in
``sims.grid2d``, shared with the theory figure.)
"""
from __future__ import annotations

import torch

from sims.grid2d import bin_mass, grid_kl  # shared with sims.fig_theory

__all__ = ["label_metrics", "confusion", "macro_f1", "grid_kl", "bin_mass"]


def confusion(pred: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """C[true, pred] counts."""
    C = torch.zeros(n_classes, n_classes, dtype=torch.long)
    C.index_put_((y.long(), pred.long()), torch.ones_like(y, dtype=torch.long), accumulate=True)
    return C


def macro_f1(C: torch.Tensor) -> float:
    """Mean over classes of F1 = 2 TP / (2 TP + FP + FN) (a class never predicted nor present counts 0)."""
    C = C.double()
    tp = C.diag()
    fp = C.sum(0) - tp
    fn = C.sum(1) - tp
    den = 2 * tp + fp + fn
    f1 = torch.where(den > 0, 2 * tp / den.clamp(min=1e-300), torch.zeros_like(tp))
    return float(f1.mean())


def label_metrics(samples: dict, true_log_prob) -> dict:
    """``samples``: {class c: (N_c, 2) samples generated for label c}; ``true_log_prob(x) -> (B, C)``.
    Returns accuracy, macro-F1, confusion (list), mean log p(c | x), and E p(c | x) (soft accuracy)."""
    ys, preds, ll, soft = [], [], [], []
    n_classes = None
    for c, x in samples.items():
        lp = true_log_prob(x.double())
        n_classes = lp.shape[-1]
        ys.append(torch.full((x.shape[0],), int(c), dtype=torch.long))
        preds.append(lp.argmax(-1))
        ll.append(lp[:, int(c)])
        soft.append(lp[:, int(c)].exp())
    y, pred = torch.cat(ys), torch.cat(preds)
    C = confusion(pred, y, n_classes)
    return dict(accuracy=float((pred == y).double().mean()), macro_f1=macro_f1(C), confusion=C.tolist(),
                log_lik=float(torch.cat(ll).mean()), soft_accuracy=float(torch.cat(soft).mean()))
