"""Rows from wherever a user keeps them: a JSONL / JSON / parquet file, a `datasets` directory, or
the name of a dataset already in the local Hugging Face cache (never downloaded). Rows are yielded
one at a time, so a large set is never held whole; every loader failure is a one-line error."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

from distill import DistillError
from distill.io.files import iter_jsonl

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Sources: rows are yielded one at a time, so a large set is never held whole
# ---------------------------------------------------------------------------------------------

def open_rows(path: str | os.PathLike) -> Iterator:
    p = Path(path)
    if p.is_file():
        if p.suffix == ".parquet":
            return _guarded(lambda: _load("parquet", data_files=str(p), split="train", streaming=True), p)
        text = p.read_text(encoding="utf-8") if p.suffix == ".json" else ""
        if text.lstrip()[:1] == "[":  # a JSON array (Alpaca's own file), not JSON lines
            try:
                return iter(json.loads(text))
            except json.JSONDecodeError as exc:
                raise DistillError(f"prompts {p} is not valid JSON ({exc.msg} at line {exc.lineno}); fix it") from None
        return (row for _, row in iter_jsonl(p, "prompts"))
    if p.is_dir():
        return _guarded(lambda: _dataset_dir(p), p)
    if HUB_NAME.match(str(path)) and p.suffix not in (".jsonl", ".json", ".parquet"):
        return _guarded(lambda: _hub(str(path)), p)
    raise DistillError(f"prompts {p} does not exist; pass a .jsonl file, a datasets directory, or the name "
                       f"(owner/name) of a dataset in the local Hugging Face cache")


def _load(*args, **kwargs):
    import datasets
    return datasets.load_dataset(*args, **kwargs)


def _dataset_dir(path: Path):
    import datasets

    if any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return _split(datasets.load_from_disk(str(path)))
    # Streamed, so nothing is cached: the ranks of a multi-GPU run would otherwise build the same
    # files in the shared HF cache together (which also keys a local directory by its name: stale
    # rows from another run's directory of the same name).
    return _split(datasets.load_dataset(str(path), streaming=True))


def _hub(name: str):
    """A hub dataset already on this machine: a `hf download` snapshot, or datasets' own cache."""
    from huggingface_hub import constants, snapshot_download

    with _offline():
        try:
            local = snapshot_download(name, repo_type="dataset", local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the hub cache; try datasets' cache next
            local = None
        try:
            ds = _load(local, streaming=True) if local else _load(name)
        except Exception as exc:  # noqa: BLE001 - whatever the loader says, the fix is the same
            home = os.path.dirname(constants.HF_HUB_CACHE)
            raise DistillError(
                f"prompts {name}: no file or directory of that name here, and no copy of the Hugging Face dataset "
                f"{name!r} in the local cache under {home} ({type(exc).__name__}); nothing is downloaded. On a "
                f"machine with network run `hf download {name} --repo-type dataset` with the same HF_HOME (a gated "
                f"dataset needs `hf auth login` and its terms accepted on the hub first), or load it there, save "
                f"it with Dataset.save_to_disk(DIR) and pass DIR") from None
    return _split(ds)


@contextlib.contextmanager
def _offline():
    # datasets and huggingface_hub read HF_HUB_OFFLINE (HF_DATASETS_OFFLINE) into these constants once,
    # at import, so setting the environment now would not reach them; restored afterwards.
    import datasets.config
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _split(ds):
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    return ds


def _guarded(load, path: Path) -> Iterator[dict]:
    """Rows of a `datasets` source, opened lazily; a loader failure (also mid-stream) is a bad-input error."""
    try:
        for row in load():
            yield dict(row)
    except DistillError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad-input error for the user
        raise DistillError(f"prompts {path} is not a loadable dataset ({exc}); pass a .jsonl file or a "
                           f"directory saved with Dataset.save_to_disk") from exc
