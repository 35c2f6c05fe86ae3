"""Depth decisions: controllers propose an action per token and layer, the depth policy enforces
the budget."""
