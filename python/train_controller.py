"""Fit skip adapters and train the budget-conditioned controller: `anee-fast train-controller`.

    python python/train_controller.py OUT_DIR [--resume] [--corpus DIR] [--steps 250] ...

See `anee-fast train-controller --help` for every option and docs/quality.md for the recipe.
"""
import sys

from anee_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-controller", *sys.argv[1:]]))
