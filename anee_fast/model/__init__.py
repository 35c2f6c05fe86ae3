"""Model weights (packed once, architecture-neutral), loading, the default model, and the
adaptive-depth forward."""
