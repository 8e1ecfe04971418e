"""Serving: user cache, dynamic batcher, KServe v2 HTTP server, Prometheus metrics."""
