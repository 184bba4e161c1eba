"""The theory experiments: "CoDIT distils the chat vector from parameter space into text space".

    python analysis/theory.py t1 --zoo ZOO [--out DIR]                 # linearisation (J·Δ by jvp)
    python analysis/theory.py t2 --zoo ZOO --run-dir RUN [--out DIR]   # parameter-space alignment
    python analysis/theory.py t3 --zoo ZOO --run-dir RUN [--out DIR]   # cross-architecture log-ratios
    python analysis/theory.py t4 --zoo ZOO [--out DIR]                 # alpha / beta sweeps
    python analysis/theory.py t1 --help                                # every option of one experiment

Each writes <name>.md, <name>.csv, <name>.json and <name>.png into --out (default
analysis/results/theory). RUN is a recipe run directory (`distill run recipes/tiny.yaml`):
data/codit, data/direct and models/{codit,direct}-seedN. See analysis/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

EXPERIMENTS = {"t1": "theory_t1", "t2": "theory_t2", "t3": "theory_t3", "t4": "theory_t4"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in EXPERIMENTS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(EXPERIMENTS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
