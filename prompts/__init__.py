"""Versioned prompt templates (YAML files beside this module) and their rendering."""

from .templates import PromptTemplate, load_templates

__all__ = ["PromptTemplate", "load_templates"]
