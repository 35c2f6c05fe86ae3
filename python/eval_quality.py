"""Quality against compute on held-out text: the same run as `anee-fast eval`, as a script.

    python python/eval_quality.py --budgets 1,0.75,0.5,0.25 --json out/quality.json --plot out/quality.png

Every option of `anee-fast eval` is accepted (see `--help`); the work is anee_fast.eval.evaluation.run_eval.
"""
import sys

from anee_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
