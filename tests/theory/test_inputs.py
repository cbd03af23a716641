"""(i) Bad input raises ValueError naming the argument: mismatched dimensions, a covariance that is not
positive semi-definite, t outside [0, T], an unknown solver name, a non-monotone time grid."""
import pytest
import torch

from theory.exact import GaussianMixture, gaussian
from theory.schedules import LinearVP
from theory.solvers import sample, time_grid

F64 = torch.float64
SCH = LinearVP()


def _model(D=2):
    return gaussian(torch.zeros(D, dtype=F64), torch.eye(D, dtype=F64), SCH)


def test_mismatched_dimensions():
    with pytest.raises(ValueError, match=r"^x: expected shape \(B, 2\)"):
        _model(2).score(torch.zeros(4, 3, dtype=F64), torch.full((4,), 0.5, dtype=F64))
    with pytest.raises(ValueError, match=r"^covs: expected shape \(1, 2, 2\) to match means"):
        GaussianMixture(torch.ones(1, dtype=F64), torch.zeros(1, 2, dtype=F64), torch.eye(3, dtype=F64)[None], SCH)


def test_covariance_not_psd():
    bad = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)  # eigenvalues 3 and -1
    with pytest.raises(ValueError, match=r"^covs: covariance is not positive semi-definite"):
        gaussian(torch.zeros(2, dtype=F64), bad, SCH)


def test_time_outside_range():
    with pytest.raises(ValueError, match=r"^t: times must lie in \[0, T=1.0\]"):
        SCH.check_time(torch.tensor([1.5], dtype=F64), "t")
    with pytest.raises(ValueError, match=r"^ts: times must lie in \[0, T"):
        sample(_model(), SCH, torch.zeros(3, 2, dtype=F64), torch.tensor([1.2, 0.5, 0.0], dtype=F64))


def test_unknown_solver_and_non_monotone_grid():
    x = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"^method: unknown solver 'rk45'"):
        sample(_model(), SCH, x, time_grid(SCH, 4), method="rk45")
    with pytest.raises(ValueError, match=r"^ts: time grid must be strictly decreasing"):
        sample(_model(), SCH, x, torch.tensor([1.0, 0.2, 0.5, 0.0], dtype=F64))
    with pytest.raises(ValueError, match=r"^kind: unknown grid 'log'"):
        time_grid(SCH, 4, kind="log")
