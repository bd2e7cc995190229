"""The model layer: loading, the T2IModel wrapper, reversible hooks, named layers, built-in architectures."""

from dori.models.loading import load_model, save_model
from dori.models.pipeline import SamplingConfig, T2IModel

__all__ = ["SamplingConfig", "T2IModel", "load_model", "save_model"]
