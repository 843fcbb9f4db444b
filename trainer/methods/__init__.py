"""Continual-learning methods, one file each, behind the contract in base.py."""

from .base import METHODS, Batch, ContinualMethod, StepData, known_methods, method_class, register_method

__all__ = ["METHODS", "Batch", "ContinualMethod", "StepData", "known_methods", "method_class", "register_method"]
