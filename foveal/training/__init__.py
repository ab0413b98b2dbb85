"""Trainers (segmentation, CA-Stream, AffinityNet). Shared pieces live in foveal.core.training."""
