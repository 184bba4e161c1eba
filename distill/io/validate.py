"""Checks at the edge: bad input is refused before anything is loaded or written.

Every stage config validates itself in one place when it is made (`SynthesizeConfig.__post_init__`
with `DecodingConfig.validate`, `distill.train.run.validate`, `EvaluateConfig.validate`,
`ApplyConfig.__post_init__`, the recipe's `_check_values`), with the helpers here:

- numbers: `finite` (nan and inf are refused: `--scale nan` would write an all-NaN model,
  `--temperature nan` crashed deep inside sampling), `at_least` (counts and limits >= 1);
- model directories: `check_model_dir` opens one with `distill.io.checkpoints.Checkpoint.open`, the
  helper `chat-vector` uses (config.json parses, every shard's header is complete), so
  synthesize, evaluate and train name the broken file in one line instead of a chained traceback;
- prompt length: `fit_positions` compares each rendered prompt's tokens + max_new_tokens with the
  models' positions (config.json's `max_position_embeddings`, also nested in `text_config`), under
  a stated policy: `drop` (the default; counted in the dataset card) or `error`;
- storage: `storage_error` turns disk-full, quota, permission and read-only errors (and torch's
  `basic_ios::clear: iostream error` when saving) into one line naming the path and saying that
  rerunning resumes; `distill.cli.main` applies it to every command.
"""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

from distill import DistillError


# ----------------------------------------------------------------------------- numbers

def finite(where: str = "", **values) -> None:
    """Each value (a number or None) must be finite: nan and +-inf are refused, naming the setting."""
    for name, value in values.items():
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)):
            raise DistillError(f"{where}{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise DistillError(f"{where}{name} must be a finite number, got {value}; pass a real number "
                               f"(nan and inf are refused)")


def at_least(low: int, where: str = "", **values) -> None:
    """Each value (None = unset, allowed) must be an integer >= low."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DistillError(f"{where}{name} must be an integer >= {low}, got {value!r}")


# ----------------------------------------------------------------------------- model directories

def check_model_dir(ref, what: str = "model"):
    """Resolve a model reference and check its files without loading a weight: config.json is a
    JSON object, every safetensors shard's header is complete (`Checkpoint.open`). Returns the
    `Checkpoint` (its `.path` the directory, its `.config` the parsed config)."""
    from distill.io.checkpoints import Checkpoint
    from distill.io.paths import resolve_model

    path = resolve_model(ref, what)
    ckpt = Checkpoint.open(path, what=what)
    if not isinstance(ckpt.config, dict) or not ckpt.config:
        raise DistillError(f"{path / 'config.json'} is not a JSON object of model settings; repair or replace it")
    return ckpt


# ----------------------------------------------------------------------------- storage

_STORAGE = {
    errno.ENOSPC: "disk full at {path}; free space and rerun",
    errno.EDQUOT: "disk quota exceeded at {path}; free space (or raise the quota) and rerun",
    errno.EACCES: "permission denied at {path}; fix its permissions or choose another output path, and rerun",
    errno.EPERM: "operation not permitted at {path}; fix its permissions or choose another output path, and rerun",
    errno.EROFS: "{path} is on a read-only file system; choose a writable output path and rerun",
}
_STORAGE_TEXT = (  # errors that lost their errno on the way (torch's writers, safetensors, datasets)
    ("basic_ios::clear", errno.ENOSPC), ("iostream error", errno.ENOSPC), ("No space left on device", errno.ENOSPC),
    ("StorageFull", errno.ENOSPC), ("os error 28", errno.ENOSPC), ("failed writing file", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT), ("Read-only file system", errno.EROFS),
    ("Permission denied", errno.EACCES),
)


def storage_error(exc: BaseException, path=None, resumes: bool = True) -> DistillError | None:
    """A one-line DistillError for a disk-full / quota / permission / read-only failure, naming
    the path (the error's own file name, else `path`); None for any other error."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno in _STORAGE else None
    if code is None and (isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError"):
        text = str(exc)
        code = next((c for needle, c in _STORAGE_TEXT if needle in text), None)
    if code is None:
        return None
    name = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    where = path if path is not None else name
    if name is not None and path is not None and not str(name).startswith(str(path)):
        where = name  # the file that failed, when it lies outside the output named by the caller
    where = str(where) if where is not None else "the output directory"
    tail = ": it resumes" if resumes else " the same command"
    return DistillError(_STORAGE[code].format(path=where) + tail)


def guard_path(path, what: str = "output") -> Path:
    """An output path whose parent chain holds no file: `--out a-file/sub` is an error, not a
    FileExistsError from mkdir."""
    path = Path(os.path.expanduser(str(path)))
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir() and parent != path:
                raise DistillError(f"{what} {path}: {parent} is a file, not a directory; choose another path")
            break
    return path
