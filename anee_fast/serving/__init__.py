"""The OpenAI-compatible HTTP server, its background engine thread and its metrics."""
