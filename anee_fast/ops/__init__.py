"""The op contract: the reference ops (pure PyTorch), the native extension's wrappers, and backend
selection."""
