"""Datasets: the name registry (classes and domains of every known dataset) and, later, loaders."""
