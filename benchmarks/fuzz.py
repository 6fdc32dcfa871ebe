"""Fuzz layerbisect with many random graphs: rewrite each (rename, fold BatchNorm, quantize),
plant a fault at a random layer, and check that the faulty layer is named; or, with
``--identity``, compare each rewritten model with itself: every value paired with itself,
at cosine 1.

The cases and the check are those of tests/test_fuzz.py (tests/fuzz_graphs.py), drawn here
from a seeded generator, so a run is reproducible and far longer than CI's. Each wrong answer
or crash is printed with the case that reproduces it:

    python benchmarks/fuzz.py --count 500 --seed 1
    python benchmarks/fuzz.py --identity --count 500
    python benchmarks/fuzz.py --case "Case(seed=739875953, ops=('conv', 'bn'), rewrite='fold', fault=0)"
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz_graphs import OPS, REWRITES, Case, check, check_identity  # noqa: E402


def cases(count: int, seed: int, max_ops: int):
    """``count`` random cases from ``seed``."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        ops = tuple(str(op) for op in rng.choice(OPS, int(rng.integers(1, max_ops + 1))))
        yield Case(int(rng.integers(2**31)), ops, str(rng.choice(REWRITES)), int(rng.integers(1000)))


def run(case: Case, identity: bool) -> str:
    """The outcome of one case (of ``check_identity`` if ``identity``, else of ``check``);
    wrong answers and crashes are printed."""
    try:
        return check_identity(case) if identity else check(case)
    except AssertionError as exc:
        print(f"WRONG {case!r}: {exc}", flush=True)
        return "wrong"
    except Exception:
        print(f"CRASH {case!r}:\n{traceback.format_exc()}", flush=True)
        return "crash"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="number of graphs (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case generator")
    parser.add_argument("--max-ops", type=int, default=10, help="most operations in a graph")
    parser.add_argument("--case", help="run one case, given as printed by a failure")
    parser.add_argument("--identity", action="store_true", help="compare each rewritten model with itself")
    args = parser.parse_args()
    todo = [eval(args.case, {"Case": Case})] if args.case else cases(args.count, args.seed, args.max_ops)
    outcomes: Counter[tuple[str, str]] = Counter()
    start = time.perf_counter()
    for case in todo:
        outcome = run(case, args.identity)
        outcomes[case.rewrite, outcome.split(":")[0]] += 1
        if outcome.startswith("error"):
            print(f"ERROR {case!r}: {outcome[7:]}", flush=True)
    total = sum(outcomes.values())
    print(f"\n{total} graphs in {time.perf_counter() - start:.0f} s")
    for rewrite in REWRITES:
        row = {o: n for (r, o), n in outcomes.items() if r == rewrite}
        if row:
            print(f"  {rewrite:10s} " + ", ".join(f"{o} {n}" for o, n in sorted(row.items())))
    return 1 if any(o in ("wrong", "crash") for _, o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
