"""Functional metric implementations; registered as components by foveal.plugins.metrics."""
