"""diffsteer: steering pre-trained diffusion models toward rewards and new conditions.

The import packages are ``theory`` (mathematics, solvers, engine), ``sims`` (toy experiments and
figures) and ``imaging`` (Stable Diffusion). This package holds the command line only."""
__version__ = "0.1.0"
