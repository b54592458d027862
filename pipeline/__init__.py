"""Offline teacher-logit distillation for compact image models."""

__version__ = "0.1.0"
