"""Datasets, image I/O and synthetic data generators (no downloads)."""
