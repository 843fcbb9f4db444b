"""Continual-learning engine: scenarios, methods, metrics (arrives with the trainer issue)."""
