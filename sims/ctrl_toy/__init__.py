"""CTRL at toy scale (Zhao et al. 2024, CTRL): conditioning a pre-trained 2-D diffusion
model on labels by RL fine-tuning, against classifier guidance, DPS and classifier-free guidance, with
exact targets p_gamma(x | y) ∝ p(y | x)^gamma p(x) normalised on a grid.

Modules: ``configs`` (frozen dataclasses; ``quick()`` variants), ``data`` (mixture law, labels, pre-trained
models exact and MLP, offline sets, exact grid targets), ``methods`` (the CTRL augmented model and
fine-tuning through ``theory.engine``, the baselines as guidance fields / eps wrappers), ``metrics``
(accuracy, macro-F1, confusion, label log-likelihood, grid-histogram KL), ``experiments`` (functions of
configs returning plain data), ``figures`` (five figures registered with ``sims.registry``).
"""
