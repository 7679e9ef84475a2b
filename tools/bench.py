"""Benchmarks: `python tools/bench.py NAME` measures ours and its baseline side by side in one run.

Each benchmark lives in tools/benchmarks/NAME.py with a `main(argv) -> dict` function; the dict is printed
last as one JSON line with at least: bench, metric (what the ratio means), ratio, target, ok, and the raw
numbers behind the ratio.
"""
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHES = ("scan", "model", "loader", "shards", "train", "zero", "fid", "compile")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:
        sys.exit(f"usage: python tools/bench.py {{{','.join(BENCHES)}}} [options]")
    mod = importlib.import_module(f"tools.benchmarks.{argv[0]}")
    result = mod.main(argv[1:])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
