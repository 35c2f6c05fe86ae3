"""The serving loop: scheduler, paged KV blocks, sequences, the model runner, CUDA graphs and
sampling."""
