"""Train the small weight-tied model and its halting heads: the same as `anee-fast train-recurrent`.

    python python/train_recurrent.py OUT_DIR [--resume] [--steps 4000] ...

See `anee-fast train-recurrent --help` for every option and docs/recurrent.md for the recipe.
"""
import sys

from anee_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-recurrent", *sys.argv[1:]]))
