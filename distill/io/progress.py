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


def trainer_progress_callback():
    """The Trainer's ProgressCallback with its bars made by `progress_bar`, so a training log
    file gets a redraw every 30 s instead of one per optimizer step. The logged loss lines
    (every `logging_steps`) are unchanged."""
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import has_length

    class LogFriendlyProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.training_bar = progress_bar(total=state.max_steps, dynamic_ncols=True, desc="training")
            self.current_step = 0

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            # A held-out pass of a few batches is over before a bar says anything.
            if state.is_world_process_zero and has_length(eval_dataloader) and len(eval_dataloader) >= 10:
                if self.prediction_bar is None:
                    self.prediction_bar = progress_bar(total=len(eval_dataloader), leave=self.training_bar is None,
                                                       dynamic_ncols=True, desc="held-out loss")
                self.prediction_bar.update(1)

    return LogFriendlyProgress()
