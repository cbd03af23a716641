"""diffsteer.theory: the mathematics of steering a VP diffusion model (see docs/theory.md).

Schedules, parameterisation conversions, exact models, the one solver, value functions, guidance
fields and the fine-tuning engine. Torch only; imports neither ``sims`` nor ``imaging``.
"""
from .exact import (
    GaussianMixture,
    LinearReward,
    QuadraticReward,
    Reward,
    gaussian,
    random_orthonormal,
    subspace_gaussian,
)
from .param import eps_to_score, eps_to_x0, model_score, model_x0_hat, score_to_eps, x0_to_eps
from .schedules import ConstantBeta, CosineVP, DiscreteVP, LinearVP, NoiseSchedule, append_dims, as_time
from .solvers import SOLVERS, Trajectory, check_grid, gaussian_log_prob, sample, time_grid, transition
