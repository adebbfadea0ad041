"""dda_ray: data-free knowledge distillation with diffusion augmentation (DDA) on Ray."""

__version__ = "0.1.0"
