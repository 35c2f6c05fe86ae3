"""Complexity-controlled evaluation of halting: the same as `anee-fast eval-recurrent`.

    python python/eval_recurrent.py MODEL_DIR [--max-ops 10] [--examples 64] [--json PATH] [--plot PATH]

See `anee-fast eval-recurrent --help` and docs/recurrent.md.
"""
import sys

from anee_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval-recurrent", *sys.argv[1:]]))
