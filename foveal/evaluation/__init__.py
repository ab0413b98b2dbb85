"""One evaluation API: explainers x metrics over a stream of batches (issue 13).

    from foveal.evaluation import evaluate, get_protocol

    p = get_protocol("ca-stream-table1")
    result = evaluate(model, open_dataset("imagenet", root, split="val"), p.explainer_components(),
                      p.metrics(224), targets="label", metric_targets="label", out="runs/table1", workers=8)
    result.aggregates["grad-cam"]["insertion"], result.ci["grad-cam"]["insertion"]

* :mod:`.engine`: :func:`evaluate` (streaming, targets, sharding under torchrun, resume);
* :mod:`.records`: the JSON-lines records on disk and the configuration hash;
* :mod:`.results`: :class:`EvaluationResult`, aggregation and bootstrap intervals;
* :mod:`.protocols`: the papers' settings as presets;
* :mod:`.outputs`: results.md / .json / .png, maps.png, report.html;
* :mod:`.items`: datasets, tensors and tuples as items; bounding boxes as masks.

``foveal evaluate-explanations`` (:mod:`foveal.cli.metrics`), the demo and the CA-Stream study
(:mod:`foveal.pipelines`) run through :func:`evaluate`. See ``docs/evaluation.md``.
"""

from .engine import evaluate
from .protocols import PROTOCOLS, Protocol, get_protocol, list_protocols
from .results import EvaluationResult, bootstrap_interval

__all__ = ["evaluate", "EvaluationResult", "bootstrap_interval", "Protocol", "PROTOCOLS", "get_protocol",
           "list_protocols"]
