"""dreamood: DREAM-OOD outlier imagination with diffusion models for out-of-distribution detection."""

__version__ = "0.1.0"
