"""Benchmark: how long the ``layerbisect`` command takes to answer before any model is read.

Runs each command in a fresh Python process ``--repeat`` times and prints the median and the
fastest wall time: ``import layerbisect``, ``layerbisect --help``, ``layerbisect --version``, a
usage error, and for comparison the import of the modules a real run needs (onnx,
onnxruntime, numpy, networkx through ``layerbisect.command``). Nothing here asserts on time.

    python benchmarks/bench_cli.py --repeat 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "import layerbisect": ["-c", "import layerbisect"],
    "layerbisect --help": ["-m", "layerbisect.cli", "--help"],
    "layerbisect --version": ["-m", "layerbisect.cli", "--version"],
    "layerbisect (usage error)": ["-m", "layerbisect.cli", "only_one.onnx", "--bogus"],
    "import layerbisect.command": ["-c", "import layerbisect.command"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"{'command':<30} {'median s':>9} {'fastest s':>10}")
    for name, command in CASES.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, *command], env=env, capture_output=True, check=False)
            times.append(time.perf_counter() - start)
        print(f"{name:<30} {statistics.median(times):>9.3f} {min(times):>10.3f}")


if __name__ == "__main__":
    main()
