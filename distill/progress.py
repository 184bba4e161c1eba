"""Progress bars that suit both a terminal and a log file."""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


def progress_bar(**kwargs):
    """A tqdm bar, redrawn at most every 30 s when stderr is not a terminal (a log file, a batch
    job): at tqdm's default of ten redraws a second, a multi-day synthesis would write millions of
    carriage-return updates into its log."""
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(**kwargs)
