"""Metrics: the functions and the metric components that wrap them, one module per family
(explanation faithfulness, localisation, segmentation; sanity checks). Registered by
:mod:`foveal.plugins.metrics`."""
