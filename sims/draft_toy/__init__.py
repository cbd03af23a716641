"""DRaFT at toy scale (Clark et al. 2024): a trained 2-D eps MLP with LoRA, fine-tuned on differentiable rewards by
DRaFT, DRaFT-K, DRaFT-LV and ReFL, and on a thresholded reward by DDPO, through ``theory.engine``.

Modules: ``configs`` (frozen dataclasses), ``model`` (the cached pre-trained model, the data law),
``rewards`` (two smooth rewards with different optima, one threshold), ``metrics`` (reward, path KL,
spread, mode coverage on fixed noise), ``experiments`` (functions of configs returning plain data),
``figures`` (registered with ``sims.registry``).
"""
