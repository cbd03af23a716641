"""Reproduction of "Gradient Guidance for Diffusion Models: An Optimization Perspective" (Guo et al.,
NeurIPS 2024) on subspace and unit-sphere data: configs, data and pre-trained models, objectives,
experiments returning numbers, and the figures of the gradient-guidance paper (``sims.gradguide.figures``)."""
from .config import NetConfig, RunConfig, Setup, SphereConfig, alg_runs, convergence_runs
from .data import basis, exact_model, objective, schedule_of, trained_model
from .experiments import pass_times, run, run_sphere
from .objectives import Distance, Linear, Quadratic
