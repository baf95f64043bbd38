"""drdd_med: Decoupled Residual Denoising Diffusion for medical image-to-image translation."""

__version__ = "0.1.0"
