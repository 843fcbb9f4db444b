"""Continual-learning methods, one file each, behind the contract in base.py; registry.py finds
them (this package's modules and the `uniil.methods` entry points), typed_options.py (shared with LLM backends) types their options."""

from .base import (METHODS, Batch, ContinualMethod, RunContext, StepData, known_methods, method_class, opt,
                   register_method, templates_option)

__all__ = ["METHODS", "Batch", "ContinualMethod", "RunContext", "StepData", "known_methods", "method_class", "opt",
           "register_method", "templates_option"]
