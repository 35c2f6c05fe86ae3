"""Offline fitting: the trained controller, its class plans, and the weight-tied model with its
halting heads."""
