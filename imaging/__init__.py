"""diffsteer.imaging: the theory solvers and fine-tuning engine on diffusers pipelines (Stable
Diffusion latents). Needs the ``imaging`` extra (diffusers, transformers, accelerate)."""
