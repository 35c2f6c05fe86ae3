"""A benchmark run's rows and failures, kept as they come: a lent GPU gives a few minutes, so one
failing case (a kernel that does not compile, a capture error, a wrong result) must not cost the
others, and a run stopped by a time limit must keep what it measured.

Each row is shown and <out>.json rewritten when it arrives; a failure is printed with its
traceback, recorded next to the rows, and `finish` exits non-zero when there was any."""
import json
import os
import sys
import traceback


class BenchResults:
    def __init__(self, out: str, show, **header):
        self.out, self.show, self.header = out, show, header
        self.rows, self.failures = [], []

    def add(self, row: dict):
        self.rows.append(row)
        self.show(row)
        self.save()

    def attempt(self, where: dict, fn) -> bool:
        """Runs fn(); where it raises, records the error under `where` (what was being measured)
        and returns False."""
        try:
            fn()
            return True
        except Exception as e:
            failure = dict(where, error=f"{type(e).__name__}: {e}")
            self.failures.append(failure)
            traceback.print_exc()
            print(f"FAILED {where}: {failure['error']}", flush=True)
            self.save()
            return False

    def save(self):
        os.makedirs(os.path.dirname(self.out) or ".", exist_ok=True)
        with open(self.out + ".json", "w") as f:
            json.dump(dict(self.header, rows=self.rows, failures=self.failures), f, indent=1)

    def finish(self):
        """Exits non-zero, naming the failures, if there were any."""
        self.save()
        if self.failures:
            sys.exit(f"{len(self.failures)} failed (details above and in {self.out}.json): "
                     + "; ".join(f["error"] for f in self.failures))
