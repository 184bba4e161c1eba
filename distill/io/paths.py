"""Where a model reference points: a local directory or a snapshot in the Hugging Face cache."""

from __future__ import annotations

import os
from pathlib import Path

from distill import DistillError


def resolve_model(ref: str | os.PathLike, what: str = "model") -> Path:
    """Map a model reference to a directory on disk.

    `ref` is a local directory, or a hub id (`org/name`) already in the Hugging Face cache.
    Nothing is downloaded: a reference that is not on disk raises an error saying how to
    supply it.
    """
    path = Path(os.path.expanduser(str(ref)))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise DistillError(f"{what} directory {path} has no config.json; point to a Hugging Face model directory")
        return path
    ref = str(ref)
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(ref, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not in the cache"
            pass
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:  # a path, not a hub id
        raise DistillError(f"{what} directory {path} does not exist; check the path")
    raise DistillError(
        f"{what} '{ref}' is not on disk (not a local directory, not in the Hugging Face cache "
        f"{os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}). "
        f"Supply it: `hf download {ref}` (huggingface_hub's CLI) on a machine with network (then copy the cache), "
        f"or pass a local directory path instead."
    )
