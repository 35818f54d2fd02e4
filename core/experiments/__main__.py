"""python -m core.experiments synthetic|identifiability [--out DIR] [--seed N]
python -m core.experiments steering --bundle DIR --json OUT [...]   (see steering --help)
python -m core.experiments texts OUT.texts.jsonl [...]   (rescore a steering run's generated texts)
python -m core.experiments selection --bundle DIR [--json OUT]   (random vs informative next pairs)
python -m core.experiments misses --bundle DIR --json OUT [...]   (where NP-BTL and NP-DPO go wrong, pair by pair)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["steering"]:
        from core.experiments.steering import main as steering_main

        return steering_main(argv[1:])
    if argv[:1] == ["selection"]:
        from core.experiments.selection import main as selection_main

        return selection_main(argv[1:])
    if argv[:1] == ["misses"]:
        from core.experiments.misses import main as misses_main

        return misses_main(argv[1:])
    if argv[:1] == ["texts"]:
        from core.experiments.steering import texts_main

        return texts_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m core.experiments", description=__doc__)
    ap.add_argument("experiment", choices=("synthetic", "identifiability", "steering"))
    ap.add_argument("--out", type=Path, default=None, help="output folder (default results/<experiment>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few training steps only: checks the pipeline, not the numbers")
    args = ap.parse_args(argv)
    out = args.out or Path("results") / args.experiment
    if args.experiment == "synthetic":
        from core.experiments.synthetic import run

        run(out, seed=args.seed, scale=0.02 if args.quick else 1.0, n_eval_tasks=50 if args.quick else 500)
    else:
        from core.experiments.identifiability import run

        run(out, seed=args.seed, steps=30 if args.quick else 1500, n_tasks=100 if args.quick else 4000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
