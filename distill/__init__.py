"""distill: move instruction-following between model families.

Two routes, side by side: the chat vector in parameter space (`distill.chat_vector.core`) and
CoDIT contrastive-decoding data in text space (`distill.synthesize.run` + `distill.train.run`).
"""

__version__ = "0.1.0"


class DistillError(Exception):
    """A user-facing error: the message names the file and says what to do.

    The CLI prints it without a traceback and exits with status 2.
    """
