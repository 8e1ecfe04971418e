"""The export steps, one module each, in pipeline order (exporter/pipeline.py runs them).

capture -> embeddings -> split (+ row scope) -> optimize -> quantize -> threads ->
tensorrt (lint) -> write -> tensorrt (build) -> parity. A step imports only from steps
before it and from the shared floors below them (exporter.errors, exporter.progress,
exporter.timing: candidates timed on this machine, exporter.evaluate: budgets, metrics, the
eager reference and stage runners; runtime, graph_passes). tests/test_step_order.py checks it.
"""
