"""Checks of the papers' claims in the regimes they argue for (docs/theory.md §6, §7): the sphere front with
the exact score (``sphere_exact``) and the dimension sweep of DRaFT vs DDPO (``dimension``)."""
