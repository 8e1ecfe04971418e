"""The export steps, one module each, in pipeline order (exporter/pipeline.py runs them).

capture -> embeddings -> split (+ row scope) -> optimize -> quantize -> threads ->
tensorrt (lint) -> write -> tensorrt (build) -> parity. A step imports only from steps
before it and from the shared floors below them (exporter.errors, exporter.progress,
exporter.timing: candidates timed on this machine, exporter.evaluate: budgets, metrics, the
eager reference and stage runners; runtime, graph_passes). tests/test_step_order.py checks it.

A step's options are a dataclass in its module (``StepOptions`` with ``exporter.args.arg``
fields: type, default, flag and help line in one place), composed by
``exporter.options.ExportOptions.STEP_OPTIONS``; ``ugsep export`` gets the flags from there.
A step takes ``ctx: ExportContext`` (imported under TYPE_CHECKING) and is listed, in order, in
``exporter.pipeline.PIPELINE``.
"""
