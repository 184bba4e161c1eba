"""The theory experiments: "CoDIT distils the chat vector from parameter space into text space".

    python analysis/theory t1 --base B --post P --prompts P.jsonl [--out DIR]   # linearisation (J·Δ by jvp)
    python analysis/theory t2 --base B --post P --codit D --direct D [--prompts EVAL.jsonl]   # alignment with Δ
    python analysis/theory t3 --base B --post P --target T --run-dir RUN        # cross-architecture log-ratios
    python analysis/theory t4 --base B --post P --target T --prompts SYNTH.jsonl --eval-prompts EVAL.jsonl
    python analysis/theory t1 --zoo ZOO [--out DIR]     # --zoo ZOO fills every model and prompt file not given
    python analysis/theory t1 --help                    # every option of one experiment

Each writes <name>.md, <name>.csv, <name>.json and <name>.png into --out (default
analysis/results/theory). RUN is a recipe run directory (`distill run recipes/tiny.yaml`):
data/codit, data/direct and models/{codit,direct}-seedN. See analysis/README.md.
"""

from __future__ import annotations

import importlib
import sys

EXPERIMENTS = {"t1": "t1_linearisation", "t2": "t2_alignment", "t3": "t3_text_correlation", "t4": "t4_sweeps"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in EXPERIMENTS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = EXPERIMENTS[argv[0]]
    # analysis.theory.<name> under `python -m analysis.theory`; <name> beside this file under
    # `python analysis/theory` (Python puts the directory run first on sys.path)
    module = importlib.import_module(f".{name}", __package__) if __package__ else importlib.import_module(name)
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
