"""Dose and power: the tuned target's IF, own-fact knowledge and conflicts against synthesis-set size.

Per method (default codit, direct, direct-masked) and synthesis draw (synthesis seed = draw), the
LARGEST size is synthesized once with the recipe's settings; a smaller size N is the rows of the
first N prompts. That is what a size-N synthesis (prompts.limit = N) writes: the prompt set is read
in order and `limit` keeps its first N usable prompts, each row samples from a seed derived from
(seed, prompt id) alone (`distill.decoding.engine.derive_seed`), rows do not depend on the batch
they share (tests/test_synthesize.py, test_decoding.py; on a GPU batched kernels may differ in the
last bits), and merged rows follow the prompt order. Every (size, draw, training seed) is trained
and evaluated with the recipe's train and evaluate settings (suites if + knowledge unless
--suites); the target base and the teacher are evaluated once as reference lines.

Into --out: dose.md/.csv/.json/.png (curves with their spread), mechanism.md/.json
(analysis/mechanism.py on the largest sets), per-run scores in runs/METHOD/nSIZE-drawD-seedS.json.
A rerun skips every finished run whose settings' key is unchanged; outputs are written atomically.

The smallest difference the design can detect (two methods at one size, two-sided 5 %, 80 % power,
normal approximation): MDE = (z_0.975 + z_0.80) * s * sqrt(2 / n), s the methods' pooled sample sd
and n the runs per method. Runs sharing a synthesis draw are not independent, so it is given twice:
over runs (n = draws x seeds) and over draw means (s = sd of per-draw means, n = draws).

The default sizes need a world with >= 1600 synthesis prompts (the tiny world has 1600, `small` 2000).

    python analysis/dose_study.py --out runs/dose                     # tiny world; sizes 160,500,1600; 3 seeds x 2 draws
    python analysis/dose_study.py --out runs/dose-small --preset small --sizes 200,630,2000
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from distill import DistillError, __version__
from distill.io.files import atomic_write_json, atomic_write_text, iter_jsonl

if __package__:
    from .dose_report import METRICS, MDE_RULE, Z, aggregate, figure, power, write_outputs
    from .mechanism import lookup, mechanism
else:  # python analysis/dose_study.py
    from dose_report import METRICS, MDE_RULE, Z, aggregate, figure, power, write_outputs
    from mechanism import lookup, mechanism

log = logging.getLogger("analysis.dose_study")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _done(path: Path, key: str) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key else None


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or len(set(values)) != len(values) or min(values) < 0:
        raise DistillError(f"--{what} {text!r}: expected distinct comma-separated integers >= 0, e.g. --{what} 0,1,2")
    return values


# ----------------------------------------------------------------------------- the stages


class Study:
    def __init__(self, recipe, zoo: Path, out: Path, args):
        self.recipe, self.zoo, self.out, self.args = recipe, zoo, out, args
        self.max_size = max(args.sizes)
        self.ids = self._prompt_ids()
        self.work_seconds = 0.0  # the recorded time of every synthesis and run, this invocation's or an earlier one's

    def _recipe(self, draw: int | None = None):
        r = copy.deepcopy(self.recipe)
        r.prompts.limit = self.max_size
        if draw is not None:
            r.synthesis.seed = draw
        r.evaluate.suites = list(self.args.suites)
        if self.args.limit_eval is not None:
            r.evaluate.limit = self.args.limit_eval
        return r

    def _prompt_ids(self) -> list[str]:
        """The ids a synthesis of the largest size reads, in order (a size-N one reads the first N)."""
        from distill.recipe.schema import synthesize_config
        from distill.synthesize.prompt_sets import load_prompt_set

        p = self.recipe.prompts
        if p.sample is not None:
            raise DistillError("prompts.sample draws another set per size, so sizes would not nest; "
                               "drop it (--set prompts.sample=null) and let prompts.limit take the first N")
        if p.limit is not None and p.limit < self.max_size:
            raise DistillError(f"the recipe reads only prompts.limit={p.limit} prompts, fewer than the largest "
                               f"--sizes {self.max_size}; --set prompts.limit=null or pass smaller --sizes")
        cfg = synthesize_config(self._recipe(), self.args.methods[0], "-")
        rows = load_prompt_set(cfg.prompts, layout=cfg.prompt_layout, turns=cfg.prompt_turns,
                               max_prompt_chars=cfg.max_prompt_chars, limit=self.max_size, dedupe=cfg.dedupe).rows
        if len(rows) < self.max_size:
            raise DistillError(f"prompts {cfg.prompts} has {len(rows)} usable prompts, fewer than the largest "
                               f"--sizes {self.max_size}; pass --sizes up to {len(rows)}, or a world with more "
                               f"synthesis prompts (--zoo / --preset)")
        return [row["id"] for row in rows]

    def synthesize(self, method: str, draw: int) -> Path:
        from distill.recipe.schema import synthesize_config
        from distill.synthesize import run as synth

        data = self.out / "data" / f"{method}-draw{draw}"
        cfg = synthesize_config(self._recipe(draw), method, str(data))
        marker, key = data.with_name(data.name + ".done.json"), _key({"settings": cfg.settings(), "ids": self.ids})
        done = _done(marker, key)
        if done and (data / "data" / "train.jsonl").is_file():
            log.info("synthesize %s draw %d: up to date, skipped", method, draw)
            self.work_seconds += done.get("seconds", 0.0)
            return data
        log.info("synthesize %s draw %d: %d prompts ...", method, draw, len(self.ids))
        t0 = time.time()
        synth.synthesize(cfg)  # resumable; a larger limit keeps the rows it has and adds the new prompts
        atomic_write_json(marker, {"key": key, "seconds": time.time() - t0})
        self.work_seconds += time.time() - t0
        return data

    def subset(self, data: Path, method: str, draw: int, size: int) -> Path:
        wanted = set(self.ids[:size])
        rows = [row for _, row in iter_jsonl(data / "data" / "train.jsonl", "synthesized data") if row["id"] in wanted]
        path = self.out / "subsets" / f"{method}-draw{draw}-n{size}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
        return path

    def run(self, method: str, size: int, draw: int, seed: int, subset: Path) -> dict:
        from distill.recipe.schema import evaluate_config, train_config

        r, name = self._recipe(draw), f"n{size}-draw{draw}-seed{seed}"
        record_path = self.out / "runs" / method / f"{name}.json"
        model = self.out / "models" / f"{method}-{name}"
        tcfg = train_config(r, str(subset), str(model), seed)
        ecfg = evaluate_config(r, str(model), str(record_path.with_suffix(".scores.json")))
        drop = lambda d, *keys: {k: v for k, v in dataclasses.asdict(d).items() if k not in keys}  # noqa: E731
        key = _key({"train": drop(tcfg, "data", "out"), "data": hashlib.sha256(subset.read_bytes()).hexdigest(),
                    "evaluate": drop(ecfg, "model", "out")})
        record = _done(record_path, key)
        if record:
            log.info("run %s %s: done, skipped", method, name)
            self.work_seconds += record.get("seconds", 0.0)
            return record
        t0 = time.time()
        trained = model.with_name(model.name + ".key")
        if not (_done(trained, key) and (model / "train_summary.json").is_file()):
            log.info("run %s %s: training on %s ...", method, name, subset.name)
            self._train(tcfg, r.train.num_gpus)
            atomic_write_json(trained, {"key": key})
        log.info("run %s %s: evaluating ...", method, name)
        summary = json.loads((model / "train_summary.json").read_text())
        record = self._score(ecfg, record_path, {
            "key": key, "method": method, "size": size, "draw": draw, "seed": seed,
            "rows": sum(1 for _ in iter_jsonl(subset)), "rows_trained": summary.get("data", {}).get("examples"),
            "scores": ecfg.out, "seconds": time.time() - t0})
        self.work_seconds += record["seconds"]
        if not self.args.keep_models:
            shutil.rmtree(model, ignore_errors=True)
            trained.unlink(missing_ok=True)
        log.info("run %s %s: IF strict %s, own knowledge %s (%.0f s)", method, name,
                 record["metrics"]["if_prompt_strict"], record["metrics"]["knowledge_own"], record["seconds"])
        return record

    @staticmethod
    def _train(cfg, num_gpus) -> None:
        from distill.recipe.pipeline import launch_train
        from distill.train import run as train

        if num_gpus and num_gpus > 1:
            launch_train(cfg, num_gpus)  # DeepSpeed's launcher, one process per GPU, as `distill run` does
        else:
            train.train(cfg)

    def reference(self, row: str, model: str) -> dict:
        from distill.recipe.schema import evaluate_config

        path = self.out / "runs" / "reference" / f"{row}.json"
        ecfg = evaluate_config(self._recipe(), model, str(path.with_suffix(".scores.json")))
        key = _key({k: v for k, v in dataclasses.asdict(ecfg).items() if k != "out"})
        record = _done(path, key)
        if record:
            log.info("reference %s: done, skipped", row)
            return record
        log.info("reference %s: evaluating %s ...", row, model)
        return self._score(ecfg, path, {"key": key, "row": row, "model": model, "scores": ecfg.out})

    @staticmethod
    def _score(ecfg, path: Path, record: dict) -> dict:
        from distill.evaluate import run as evaluate

        path.parent.mkdir(parents=True, exist_ok=True)  # evaluate checks that the scores' parent is writable
        scores = evaluate.run_evaluation(ecfg)
        record["metrics"] = {k: lookup(scores, keys) for k, _, keys in METRICS}
        atomic_write_json(path, record)
        return record


# ----------------------------------------------------------------------------- command line


def study(args, argv: list[str]) -> dict:
    from distill.recipe.schema import SYNTHESIS_METHODS, load_recipe, resolve_references

    t0 = time.time()
    recipe = load_recipe(args.recipe, args.overrides)
    unknown = [m for m in args.methods if m not in SYNTHESIS_METHODS]
    if unknown or not args.methods:
        raise DistillError(f"--methods: unknown {unknown}; use any of {', '.join(SYNTHESIS_METHODS)}")
    if args.zoo:
        zoo = Path(args.zoo)
        if not (zoo / "world.json").is_file():
            raise DistillError(f"--zoo {zoo}: not a world directory (no world.json); pass the directory "
                               f"`distill zoo build` prints")
    else:
        from distill.world import build_zoo

        zoo = build_zoo(args.preset or (recipe.world.preset if recipe.world else "tiny"))
    recipe = resolve_references(recipe, str(zoo))
    if not recipe.evaluate.zoo:
        raise DistillError(f"{args.recipe}: evaluate.zoo is not set; the study scores against a world "
                           f"(--set evaluate.zoo=DIR)")
    seeds = args.seeds if args.seeds is not None else list(recipe.train.seeds)
    notes = []
    if len(seeds) < 3 or len(args.draws) < 2 or max(args.sizes) < 10 * min(args.sizes) or len(args.sizes) < 3:
        notes.append("below the study's design (>= 3 seeds, >= 2 draws, >= 3 sizes spanning 10x): a reduced run.")
    out = Path(args.out).resolve()  # the run records name their scores files by this path
    s = Study(recipe, zoo, out, argparse.Namespace(**{**vars(args), "seeds": seeds}))
    refs = {"target-base": s.reference("target-base", recipe.target.base),
            "source-post": s.reference("source-post", recipe.source.post)}
    records, largest = [], {}
    total, i = len(args.methods) * len(args.draws) * len(args.sizes) * len(seeds), 0
    for m in args.methods:
        for d in args.draws:
            data = s.synthesize(m, d)
            largest.setdefault(m, []).append(data)
            for n in sorted(args.sizes):
                subset = s.subset(data, m, d, n)
                for seed in seeds:
                    i += 1
                    log.info("[%d/%d] %s size %d draw %d seed %d", i, total, m, n, d, seed)
                    records.append(s.run(m, n, d, seed, subset))
    sizes = sorted(args.sizes)
    points = aggregate(records, args.methods, sizes)
    result = {"recipe": str(args.recipe), "overrides": list(args.overrides), "zoo": str(zoo), "sizes": sizes,
              "methods": list(args.methods), "seeds": seeds, "draws": list(args.draws), "suites": list(args.suites),
              "limit_eval": args.limit_eval, "z": Z, "mde_rule": MDE_RULE, "points": points,
              "power": power(points, args.methods, sizes),
              "reference": refs, "runs": records, "notes": notes}
    student = {m: [json.loads(Path(r["scores"]).read_text()) for r in records
                   if r["method"] == m and r["size"] == sizes[-1]] for m in args.methods}
    try:
        mech = mechanism(largest, Path(recipe.prompts.synthesis), zoo / "knowledge" / "questions.jsonl", out,
                         student, title="The mechanism in the data (largest sets)")
        result["mechanism"], result["mechanism_md"] = mech["methods"], mech["markdown"]
    except DistillError as exc:
        notes.append(f"mechanism table skipped: {exc}")
    import torch

    result["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                         "python": platform.python_version(), "distill": __version__,
                         "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"}
    result["command"] = shlex.join([sys.executable, "analysis/dose_study.py", *argv])
    fig = figure(out, result)
    if fig is None:
        notes.append("figure skipped: matplotlib is not importable")
    result["figure"], result["wall_seconds"], result["work_seconds"] = fig, time.time() - t0, s.work_seconds
    write_outputs(out, result)
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/dose-study", help="study directory (data, subsets, runs, tables); "
                                                            "a rerun into it skips finished runs")
    p.add_argument("--recipe", default=str(RECIPE),
                   help="recipe whose settings every stage uses (default: recipes/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, as `distill run --set` (e.g. train.epochs=4); repeatable")
    p.add_argument("--zoo", help="world directory for ${zoo} (default: build or reuse --preset's)")
    p.add_argument("--preset", help="world preset when --zoo is not given (default: the recipe's world.preset)")
    p.add_argument("--sizes", default="160,500,1600", help="synthesis-set sizes (rows), comma-separated")
    p.add_argument("--methods", default="codit,direct,direct-masked",
                   help="data methods, comma-separated (codit, direct, direct-masked, best-of-n)")
    p.add_argument("--seeds", help="training seeds, comma-separated (default: the recipe's train.seeds)")
    p.add_argument("--draws", default="0,1", help="synthesis draws (synthesis seeds), comma-separated")
    p.add_argument("--suites", default="if,knowledge", help="evaluation suites (ppl, judge: opt in)")
    p.add_argument("--limit-eval", type=int, help="evaluate on the first N rows of each evaluation file")
    p.add_argument("--keep-models", action="store_true", help="keep each tuned model (default: removed once scored)")
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    try:
        args.sizes, args.draws = _ints(args.sizes, "sizes"), _ints(args.draws, "draws")
        args.seeds = _ints(args.seeds, "seeds") if args.seeds else None
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        args.suites = [x.strip() for x in args.suites.split(",") if x.strip()]
        if min(args.sizes) < 1 or (args.limit_eval is not None and args.limit_eval < 1):
            raise DistillError("--sizes and --limit-eval must be positive")
        result = study(args, argv)
    except DistillError as exc:
        print(f"dose_study: error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "dose.md").read_text())
    print(f"dose_study: wrote {args.out}/dose.md, dose.csv, dose.json" + (", dose.png" if result["figure"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
