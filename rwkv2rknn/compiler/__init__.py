"""The compile driver: streaming, the graph IR, range tracing and its cache, resources; the one place that orders the passes."""
