"""The synthesis output directory D: created or continued (its provenance must match the run),
an older run's rows discarded on --overwrite, and what a failed first run left removed."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from distill import DistillError, __version__
from distill.synthesize.config import SELECTION_KEYS
from distill.synthesize.records import finished_rows

# What a run recorded before a setting existed meant: rows flagged by our n-gram rule, not "public".
LEGACY_DEFAULTS = {"repetition_rule": "ngram"}


def prepare_out(cfg, prompt_ids: list[str], record: dict) -> Path:
    """Create D (or check that an existing D continues this very run) and record provenance."""
    from distill.io.files import atomic_write_json

    out = Path(cfg.out)
    prov = out / "provenance.json"
    try:
        if out.exists() and not out.is_dir():
            raise DistillError(f"output {out} is a file; choose a directory path for --out")
        if prov.exists():
            changed = changed_settings(out, cfg)
            # An output without a finished row (a run that failed at once) has nothing to lose.
            if changed and not cfg.overwrite and finished_rows(out):
                raise DistillError(f"output {out} holds a run with other settings {changed}; rerun with the "
                                   f"same settings to resume, or pass --overwrite, or choose another --out")
            if changed:
                discard_rows(out)
        elif out.exists() and not only_skeleton(out) and not cfg.overwrite:
            raise DistillError(f"output {out} exists and is not a synthesis run; choose another --out or --overwrite")
        (out / "shards").mkdir(parents=True, exist_ok=True)
        atomic_write_json(prov, {"distill_version": __version__, "settings": cfg.settings(), **record,
                                 "prompt_ids": prompt_ids, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    except OSError as exc:
        from distill.io.validate import storage_error

        raise storage_error(exc, out) or DistillError(f"cannot write to {out} ({exc.strerror}); choose a writable "
                                                      f"--out") from None
    return out


def changed_settings(out: Path, cfg) -> dict:
    """{setting: (recorded, now)} for each row-changing setting in which the run recorded in D's
    provenance differs from `cfg` (empty: no run there, or the same settings)."""
    prov = Path(out) / "provenance.json"
    if not prov.exists():
        return {}
    old = json.loads(prov.read_text())["settings"]
    # A key an older distill did not record counts as its default (the rows were made that way).
    defaults = {f.name: f.default for f in dataclasses.fields(type(cfg))} | LEGACY_DEFAULTS
    return {k: (old.get(k, defaults.get(k)), v) for k, v in cfg.settings().items()
            if k not in SELECTION_KEYS and old.get(k, defaults.get(k)) != v}


def discard_before_launch(cfg) -> bool:
    """What the ranks of a launch cannot do themselves (`discard_rows` refuses under WORLD_SIZE > 1):
    with --overwrite, drop an older run made with other settings. Run once, by the process that
    launches the ranks, before it launches them; True if it discarded one."""
    from distill.io.locking import output_lock

    out = Path(cfg.out)
    if not cfg.overwrite or not out.is_dir():
        return False
    with output_lock(out, "synthesis output"):
        if not changed_settings(out, cfg):
            return False
        discard_rows(out)
        (out / "provenance.json").unlink()  # else every rank would find the old settings and discard again
    return True


def only_skeleton(out: Path) -> bool:
    """D holds nothing but what a run killed before its provenance was in place leaves: an empty
    shards/ and the temporary copy of provenance.json (removed when it is written again)."""
    return all((p.name == "shards" and p.is_dir() and not any(p.iterdir()))
               or p.name.startswith(".provenance.json.tmp-") for p in out.iterdir())


def discard_rows(out: Path) -> None:
    """--overwrite: drop our own files of the old run (nothing else in D).

    One process only: ranks start independently, so one rank could delete a shard another rank
    has just begun to write."""
    import shutil

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        raise DistillError(f"output {out} holds an older run, and {world} ranks cannot discard it safely in "
                           f"parallel; delete {out} first (or choose another --out), then launch again")

    shutil.rmtree(out / "shards", ignore_errors=True)
    shutil.rmtree(out / "data", ignore_errors=True)
    (out / "README.md").unlink(missing_ok=True)
    (out / "shards").mkdir()


def changed_prompts(done: dict[str, dict], prompts: list[dict], cfg) -> bool:
    """A resumed run must answer the same prompts: matching ids alone would keep stale rows for
    edited prompts. True (start over) only with --overwrite; otherwise an error."""
    changed = [p["id"] for p in prompts if p["id"] in done and done[p["id"]]["messages"][:-1] != p["messages"]]
    if changed and not cfg.overwrite:
        raise DistillError(f"output {cfg.out} holds rows for {len(changed)} prompt id(s) whose prompt in {cfg.prompts} "
                           f"has changed since (first: id {changed[0]!r}); restore the original prompts, or pass "
                           f"--overwrite to start over, or choose another --out")
    return bool(changed)


def remove_skeleton(out: Path, created: bool) -> None:
    """D was empty or absent when this run began: if it still holds no row, remove what the run
    put there (and D itself if the run made it)."""
    import shutil

    try:
        if not out.is_dir() or finished_rows(out):
            return
        if created:
            shutil.rmtree(out, ignore_errors=True)
            return
        for p in out.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    except (DistillError, OSError):  # a corrupt or unreadable shard: keep it for the user to see
        pass
