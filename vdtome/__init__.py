"""vdtome: training-free acceleration for video diffusion pipelines (token merging and friends)."""

__version__ = "0.1.0"
