"""`distill run RECIPE.yaml`: the whole pipeline, stage by stage, with caching.

zoo → preflight → chat-vector → weight-arithmetic [→ theory-t1] → synthesize-{codit,direct[,direct-masked]}
    → train-{method}-seed{s} [→ train-gold-sft-seed{s}] [→ theory-t3] → evaluate-{model} → report

(train-gold-sft-seed{s}: the target on the expert's own SFT data, `source.sft_data`, when the recipe
names it: the text route's ceiling.)

(theory-t1 and theory-t3, the theory experiments of `distill.theory`, run when the recipe's
`theory.t1` / `theory.t3` are true; both are off by default.)

Every stage writes into the run directory. A stage records a key (a hash of its settings
and of the keys of the stages it reads) in `stages.json` when it finishes, with its wall time and
the GPUs it held; on a rerun a stage whose key is unchanged and whose outputs are still there is
skipped, and the report says it was cached. An interrupted stage simply runs again: synthesis
appends and resumes, training resumes from its last checkpoint, the rest write atomically.

Where a recipe has several GPUs (train.num_gpus, or synthesis.num_gpus / evaluate.num_gpus), each
stage is launched with one process per GPU: training through DeepSpeed's launcher, synthesis and
evaluation through torchrun, whose ranks split the prompts or items and merge what equals the
one-process output (`distill.recipe.launch`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shlex
import time
from pathlib import Path

from distill import DistillError, __version__
from distill.io.files import atomic_write_json, fault_point
from distill.recipe.launch import gpus_held, launch_evaluation, launch_synthesis, launch_train  # noqa: F401
from distill.recipe.state import Stage, StageState
from distill.train.cli import train_command
from distill.recipe.schema import (PLACEMENT_KEYS, Recipe, apply_config, as_dict, evaluate_config, extract_config,
                                   load_recipe, resolve_references, saved_dict, synthesize_config, train_config)

log = logging.getLogger("distill.recipe.pipeline")
GOLD = "gold-sft"  # the row trained on source.sft_data


def _architecture(model_dir: str | Path) -> str:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return (cfg.get("architectures") or [cfg.get("model_type", "?")])[0]


class Pipeline:
    """Builds the stage list of one recipe and runs it."""

    def __init__(self, recipe: Recipe, recipe_path: Path):
        self.recipe = recipe
        self.recipe_path = recipe_path
        self.run_dir = Path(recipe.run_dir)  # made by run(): a preflight failure leaves nothing behind
        self.state = StageState(self.run_dir)
        self.notes: list[str] = []
        self.models: dict[str, str] = {}  # row name -> model directory to evaluate
        self.ran: list[str] = []  # the stages this invocation ran (the others in stages.json are cached)

    # -- stages -------------------------------------------------------------------------

    def preflight(self) -> None:
        """Every model and prompt file must be on disk before any work starts."""
        from distill.io.models import resolve_model

        from distill.recipe.schema import undefined_lines

        r = self.recipe
        undefined = undefined_lines(r, skip=("prompts.synthesis",))  # ${VAR}s nothing defines, by key
        missing = [f"  {line}" for line in undefined.values()]
        refs = [("source.base", r.source.base), ("source.post", r.source.post), ("target.base", r.target.base)]
        if r.weight_arithmetic.target:
            refs.append(("weight_arithmetic.target", r.weight_arithmetic.target))
        if r.source.sft_data and not Path(r.source.sft_data).exists() and "source.sft_data" not in undefined:
            missing.append(f"  source.sft_data = {r.source.sft_data}: not found; point it to the expert's SFT data "
                           f"(a .jsonl of instruction+response rows or a `datasets` directory), or drop the key")
        resolved = {}
        for key, ref in refs:
            if not ref:
                missing.append(f"  {key}: not set (add it to {self.recipe_path} or pass --set {key}=PATH)")
                continue
            if key in undefined:
                continue
            try:
                resolved[key] = str(resolve_model(ref, key))
            except DistillError as exc:
                missing.append(f"  {exc}\n    or override: --set {key}=/path/to/model")
        prompts = r.prompts.synthesis
        unset = re.fullmatch(r"\$\{(\w+)\}", prompts or "")
        if unset:  # an environment variable the recipe reads, left unset
            missing.append(f"  prompts.synthesis = {prompts}: the environment variable {unset.group(1)} is not set; "
                           f"set it to a JSONL file or a `datasets` directory of prompts, or pass "
                           f"--set prompts.synthesis=/path/prompts.jsonl")
        elif not prompts or not (Path(prompts).exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", prompts)):
            missing.append(
                f"  prompts.synthesis = {prompts or '(unset)'}: not found; point it to a JSONL file, a "
                f"`datasets` directory or a cached hub dataset of prompts: --set prompts.synthesis=/path/prompts.jsonl"
            )
        else:  # the first usable row: the layout is readable (and a hub name is in the cache)
            from distill.synthesize.prompt_sets import load_prompt_set

            try:
                load_prompt_set(prompts, layout=r.prompts.layout, turns=r.prompts.turns, limit=1)
            except DistillError as exc:
                missing.append(f"  prompts.synthesis: {exc}")
        if len(missing) == 1 and "\n" not in missing[0]:  # one problem: one line
            raise DistillError(f"recipe {self.recipe_path} cannot start: {missing[0].strip()}")
        if missing:
            raise DistillError(
                f"recipe {self.recipe_path} cannot start; these inputs are not on disk:\n" + "\n".join(missing)
                + "\nModels resolve to a local directory or the Hugging Face cache (HF_HOME / HF_HUB_CACHE); "
                "nothing is downloaded at run time."
            )
        r.source.base, r.source.post = resolved["source.base"], resolved["source.post"]
        r.target.base = resolved["target.base"]
        if "weight_arithmetic.target" in resolved:
            r.weight_arithmetic.target = resolved["weight_arithmetic.target"]
        # The pair's tokenizers and configs (no weights): a pair CoDIT cannot decode stops the run now,
        # not after the chat-vector stage.
        from distill.decoding.pair import check_pair

        s = r.synthesis
        try:
            check_pair(r.source.post, r.source.base, chat_template=s.chat_template,
                       chat_template_kwargs=s.chat_template_kwargs)
        except DistillError as exc:
            raise DistillError(f"recipe {self.recipe_path}: source.post and source.base cannot be decoded "
                               f"together: {exc}") from None

    def stage_chat_vector(self) -> dict:
        from distill.chat_vector.core import run_extract

        out = self.run_dir / "chat_vector"
        run_extract(extract_config(self.recipe, str(out)))
        return {"vector": str(out)}

    def stage_weight_arithmetic(self) -> dict:
        from distill.chat_vector.core import run_apply

        out = self.run_dir / "models" / "weight-arithmetic"
        run_apply(apply_config(self.recipe, self.state.output("chat-vector")["vector"], str(out)))
        return {"model": str(out)}

    def stage_synthesize(self, method: str) -> dict:
        from distill.synthesize.run import synthesize

        out = self.run_dir / "data" / method
        cfg, n = synthesize_config(self.recipe, method, str(out)), self.processes("synthesis")
        launch_synthesis(cfg, n, str(self.recipe_path)) if n > 1 else synthesize(cfg)
        return {"data": str(out)}

    def stage_train(self, method: str, seed: int) -> dict:
        t = self.recipe.train
        out = self.run_dir / "models" / f"{method}-seed{seed}"
        data = self.recipe.source.sft_data if method == GOLD else self.state.output(f"synthesize-{method}")["data"]
        cfg = train_config(self.recipe, data, str(out), seed)
        log.info("train-%s-seed%d = %s", method, seed, shlex.join(train_command(cfg)))
        if t.num_gpus and t.num_gpus > 1:
            self._launch_train(cfg, t.num_gpus)
        else:
            from distill.train.run import train

            train(cfg)
        return {"model": str(out)}

    def _launch_train(self, cfg, num_gpus: int) -> None:
        launch_train(cfg, num_gpus)

    def stage_evaluate(self, row: str, model: str) -> dict:
        from distill.evaluate.run import run_evaluation

        out = self.run_dir / "scores" / f"{row}.json"
        cfg, n = evaluate_config(self.recipe, model, str(out)), self.processes("evaluate")
        launch_evaluation(cfg, n, str(self.recipe_path)) if n > 1 else run_evaluation(cfg)
        return {"scores": str(out)}

    def processes(self, section: str) -> int:
        """How many processes (one per GPU) a stage of `section` runs on: its num_gpus, else train's."""
        n = getattr(self.recipe, section).num_gpus
        n = self.recipe.train.num_gpus if n is None else n
        return n if n and n > 1 else 1

    def stage_theory_t1(self) -> dict:
        """T1 on the source pair: the first theory.prompts_limit synthesis prompts (as prompts.*
        selects and renders them for synthesis; prompts.sample aside), synthesis' alpha and template."""
        from distill.synthesize.prompt_sets import load_prompt_set
        from distill.theory.linearise import run_t1

        r, th, s = self.recipe, self.recipe.theory, self.recipe.synthesis
        p, out = r.prompts, self.run_dir / "theory" / "t1"
        limit = self._t1_prompts()
        rows = load_prompt_set(p.synthesis, layout=p.layout, turns=p.turns, max_prompt_chars=p.max_prompt_chars,
                               dedupe=p.dedupe, limit=limit).rows
        res = run_t1(r.source.base, r.source.post, rows, out, limit=limit, max_new_tokens=th.max_new_tokens,
                     alpha=s.alpha, batch_size=th.batch_size, chunk_tokens=th.chunk_tokens,
                     lambdas=tuple(th.lambdas), device=th.device, dtype=th.dtype or "auto",
                     chat_template=s.chat_template, chat_template_kwargs=s.chat_template_kwargs,
                     prompts_name=f"{p.synthesis}, the first {limit}")
        if not res["sequences"]:
            log.warning("theory-t1: no prompt got a non-empty response from source.post; %s says so", res["md"])
        return {"table": res["md"], "numbers": str(out / "t1_linearisation.json")}

    def stage_theory_t3(self) -> dict:
        """T3 on the source pair, the target base, this run's synthesized datasets and tuned targets."""
        from distill.theory.text_ratio import run_t3

        r, th, s = self.recipe, self.recipe.theory, self.recipe.synthesis
        out = self.run_dir / "theory" / "t3"
        texts = {m: self._output_of(f"synthesize-{m}", "data", self.run_dir / "data" / m) for m in s.methods}
        tuned = {m: [self._output_of(f"train-{m}-seed{sd}", "model", self.run_dir / "models" / f"{m}-seed{sd}")
                     for sd in r.train.seeds] for m in s.methods}
        res = run_t3(r.source.base, r.source.post, r.target.base, texts, tuned, out, n=th.t3_n,
                     batch_size=th.batch_size, device=th.device, dtype=th.dtype or "auto",
                     chat_template=s.chat_template, chat_template_kwargs=s.chat_template_kwargs)
        return {"table": res["md"], "numbers": str(out / "t3_text_correlation.json")}

    def _output_of(self, stage: str, key: str, default: Path) -> str:
        path = self.state.output(stage).get(key) or str(default)
        if not Path(path).exists():
            raise DistillError(f"{stage} has not written {path}; run it first (distill run ... --only {stage})")
        return path

    def _t1_prompts(self) -> int:
        """How many synthesis prompts T1 reads: theory.prompts_limit, at most the prompts.limit synthesis reads."""
        p, th = self.recipe.prompts, self.recipe.theory
        return min(th.prompts_limit, p.limit) if p.limit else th.prompts_limit

    def _theory_settings(self, test: str) -> dict:
        """What changes one theory stage's numbers: the pair, its prompt rendering, and its own
        keys of the theory section (not the other test's, nor the t1/t3 switches)."""
        r, s = self.recipe, as_dict(self.recipe)
        own = {"t1": ("prompts_limit", "max_new_tokens", "chunk_tokens", "lambdas"), "t3": ("t3_n",)}[test]
        settings = {"source": s["source"], "chat_template": r.synthesis.chat_template,
                    "chat_template_kwargs": r.synthesis.chat_template_kwargs,
                    "theory": {k: s["theory"][k] for k in own + ("batch_size", "device", "dtype")}}
        if test == "t1":
            p = r.prompts
            settings.update(alpha=r.synthesis.alpha, prompts={
                "synthesis": p.synthesis, "limit": self._t1_prompts(),
                "layout": p.layout, "turns": p.turns, "max_prompt_chars": p.max_prompt_chars, "dedupe": p.dedupe})
        else:
            settings["target"] = s["target"]
        return settings

    # -- plan -----------------------------------------------------------------------------

    def plan(self) -> list[Stage]:
        r = self.recipe
        s = {k: v for k, v in as_dict(r).items()}
        stages: list[Stage] = []
        models = {"target-base": r.target.base, "source-post": r.source.post}
        # Where a stage runs (its processes, one per GPU) changes no output: no part of its key.
        placed = {sec: {k: v for k, v in s[sec].items() if k not in PLACEMENT_KEYS}
                  for sec in ("synthesis", "evaluate")}
        on = {sec: self._on(getattr(r, sec).device, self.processes(sec)) for sec in ("synthesis", "evaluate")}
        on |= {"train": self._on(None, self.processes("train")), "theory": self._on(r.theory.device)}
        wa_ok, why = self._weight_arithmetic_applies()
        if wa_ok:
            stages.append(Stage("chat-vector", {"base": r.source.base, "post": r.source.post,
                                                "chat_vector": s["chat_vector"]}, self.stage_chat_vector,
                                **self._on(r.chat_vector.device)))
            stages.append(Stage("weight-arithmetic", s["weight_arithmetic"], self.stage_weight_arithmetic,
                                ["chat-vector"], **self._on(r.weight_arithmetic.device)))
            models["weight-arithmetic"] = str(self.run_dir / "models" / "weight-arithmetic")
        else:
            self.notes.append(f"Weight-arithmetic route skipped: {why}.")
        if r.theory.t1:  # the source pair alone: before synthesis, so a pair T1 cannot take fails early
            stages.append(Stage("theory-t1", self._theory_settings("t1"), self.stage_theory_t1, **on["theory"]))
        for method in r.synthesis.methods:  # all data first, then all training
            # The method list itself is not a setting of one method's data: adding a method reuses the others.
            synthesis = {k: v for k, v in placed["synthesis"].items() if k != "methods"}
            settings = {"source": s["source"], "prompts": s["prompts"], "synthesis": synthesis, "method": method}
            stages.append(Stage(f"synthesize-{method}", settings, lambda m=method: self.stage_synthesize(m),
                                **on["synthesis"]))
        for method in r.synthesis.methods:
            for seed in r.train.seeds:
                name = f"train-{method}-seed{seed}"
                settings = {"target": s["target"], "train": s["train"], "seed": seed}
                stages.append(Stage(name, settings, lambda m=method, sd=seed: self.stage_train(m, sd),
                                    [f"synthesize-{method}"], **on["train"]))
                models[f"{method}-seed{seed}"] = str(self.run_dir / "models" / f"{method}-seed{seed}")
        if r.source.sft_data:  # the ceiling: the same training on the teacher's own SFT data
            for seed in r.train.seeds:
                settings = {"target": s["target"], "train": s["train"], "seed": seed, "data": r.source.sft_data}
                stages.append(Stage(f"train-{GOLD}-seed{seed}", settings, lambda sd=seed: self.stage_train(GOLD, sd),
                                    **on["train"]))
                models[f"{GOLD}-seed{seed}"] = str(self.run_dir / "models" / f"{GOLD}-seed{seed}")
        if r.theory.t3:  # every synthesized dataset and tuned target of the run
            reads = [st.name for st in stages if st.name.startswith(("synthesize-", "train-"))]
            stages.append(Stage("theory-t3", self._theory_settings("t3"), self.stage_theory_t3, reads, **on["theory"]))
        if r.evaluate.zoo:
            for row, model in models.items():
                producer = [st.name for st in stages if st.name.endswith(row)]
                stages.append(Stage(f"evaluate-{row}", {"model": model, "evaluate": placed["evaluate"]},
                                    lambda rw=row, md=model: self.stage_evaluate(rw, md), producer,
                                    **on["evaluate"]))
        else:
            self.notes.append("Evaluation skipped: set evaluate.zoo to a directory with the world's layout.")
        reads = [st.name for st in stages if st.name.startswith(("evaluate-", "theory-"))]
        stages.append(Stage("report", {"version": __version__}, self.stage_report, reads))
        self.models = models
        return stages

    @staticmethod
    def _on(device: str | None, processes: int = 1) -> dict:
        return {"processes": processes, "gpus": gpus_held(device, processes)}

    def _weight_arithmetic_applies(self) -> tuple[bool, str]:
        wa = self.recipe.weight_arithmetic
        if not wa.target:
            return False, "no same-architecture target named (weight_arithmetic.target)"
        src, tgt = _architecture(self.recipe.source.base), _architecture(wa.target)
        if src != tgt:
            return False, f"weight_arithmetic.target is {tgt}, the source is {src}; a chat vector needs the same architecture"
        return True, ""

    def stage_report(self) -> dict:
        from distill.recipe.report import write_report

        path = write_report(self.run_dir, self.recipe, self.recipe_path, self.state.done, self.notes,
                            ran=self.ran)
        return {"report": str(path)}

    # -- run ------------------------------------------------------------------------------

    def run(self, start_from: str | None = None, only: str | None = None) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stages = self.plan()
        names = [st.name for st in stages]
        if start_from:
            matches = [n for n in names if fnmatch.fnmatch(n, start_from) or n.startswith(start_from)]
            if not matches:
                raise DistillError(f"--from {start_from}: no such stage; stages: {', '.join(names)}")
            self.state.forget(names[names.index(matches[0]):])
        selected = names
        if only:
            selected = [n for n in names if fnmatch.fnmatch(n, only) or n.startswith(only)]
            if not selected:
                raise DistillError(f"--only {only}: no such stage; stages: {', '.join(names)}")
        total = len(stages)
        for i, stage in enumerate(stages, 1):
            if stage.name not in selected:
                continue
            if stage.name != "report" and self.state.is_current(stage):
                log.info("[%d/%d] %s: up to date, skipped", i, total, stage.name)
                continue
            log.info("[%d/%d] %s ...", i, total, stage.name)
            t0 = time.time()
            outputs = stage.run()
            fault_point("run.stage")
            self.state.record(stage, outputs, time.time() - t0)
            self.ran.append(stage.name)
            log.info("[%d/%d] %s done in %.1f s", i, total, stage.name, time.time() - t0)
        return self.run_dir / "report.md"


def run_recipe(path: str | os.PathLike, overrides: list[str] = (), start_from: str | None = None,
               only: str | None = None) -> Path:
    path = Path(path)
    recipe = load_recipe(path, overrides)
    zoo = None
    if recipe.world:
        # The world is the embedded default's source of models; it caches itself.
        from distill.world import build_zoo

        log.info("[zoo] building or reusing the embedded world (preset %s)", recipe.world.preset)
        zoo = str(build_zoo(recipe.world.preset))
    recipe = resolve_references(recipe, zoo, undefined="keep")  # the preflight lists every undefined ${VAR}
    pipeline = Pipeline(recipe, path)
    pipeline.preflight()
    from distill.io.locking import output_lock

    # One `distill run` per run directory at a time: a second one is refused, naming the first.
    with output_lock(recipe.run_dir, "run directory"):
        pipeline.state = StageState(pipeline.run_dir)  # what is finished, read under the lock
        atomic_write_json(Path(recipe.run_dir) / "recipe.json", saved_dict(recipe))  # no environment values
        return pipeline.run(start_from=start_from, only=only)


def add_cli(sub, summary: str | None = None) -> None:
    p = sub.add_parser(
        "run",
        help=summary,
        description=__doc__,
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe YAML file, e.g. recipes/tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting, e.g. --set train.epochs=1 --set source.base=/models/base "
                        "(value parsed as YAML; repeatable)")
    p.add_argument("--from", dest="start_from", metavar="STAGE",
                   help="rerun from this stage on (name or prefix, e.g. train), even if up to date")
    p.add_argument("--only", metavar="STAGE", help="run only the stages matching this name, prefix or glob")
    p.set_defaults(func=lambda a: print(run_recipe(a.recipe, a.overrides, a.start_from, a.only)))
