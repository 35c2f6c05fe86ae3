"""Drop-ins for other libraries' interfaces (ANEE 0.4)."""
