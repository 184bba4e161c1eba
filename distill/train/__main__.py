"""`python -m distill.train ARGS` = `distill train ARGS` (what the deepspeed launcher runs)."""

from distill.train.cli import main

raise SystemExit(main())
