"""The recipe file: one typed schema, validated, with `--set key=value` overrides.

A recipe names the source pair, the target, the prompts and every setting of every stage. Its
stage sections ARE the stages' configs (`distill.config.section`): `synthesis:` and `prompts:` are
`SynthesizeConfig`, `train:` is `TrainConfig`, `evaluate:` is `EvaluateConfig`, `chat_vector:` and
`weight_arithmetic:` are the chat-vector configs, each without the paths the pipeline fills in and
with the recipe-only keys (`synthesis.methods`, `train.seeds`, and `num_gpus` of train, synthesis and
evaluate: how many processes, one per GPU, each stage is launched on) on top. Every option of
a stage's command line is a key of its section, with the same name, default and help.
Unknown keys and wrong types are errors that name the key and the file (pydantic, strict). Strings may refer
to `${zoo}` (the embedded world's directory, when the recipe builds one), `${run_dir}`,
`${name}`, and environment variables (`${DISTILL_PROMPTS}`).

Rules for references and paths:

- An undefined reference is an error naming it, the file and the key (`${UNDEFINED}` is never
  left as literal text to surface later as a strange model path); `distill run` lists every
  one, with the other missing inputs, before anything runs.
- The run directory stays under the run root `runs/` (relative to the working directory): a
  relative `run_dir` (the default `runs/${name}`) that climbs out of it, e.g. through
  `name: ../../x`, is an error. A `run_dir` the user writes as an absolute path (or starting
  with `~`, or with an environment variable, the user's own setting) is used as written; what
  `${name}` fills into it must still not climb above its written part.
- Saved recipe files (`recipe.json` in the run directory, the report's settings) hold what the
  user wrote: a value taken from the environment is saved as its reference (`${DISTILL_PROMPTS}`),
  never as the environment's value (which may be private: a home path, a token), unless the user
  wrote the value itself in the recipe or with `--set`. `${zoo}`, `${run_dir}` and `${name}` are
  distill's own and saved filled in.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from distill import DistillError
from distill.chat_vector.config import ApplyConfig, ExtractConfig
from distill.config import opt, section, stage_values, validate
from distill.recipe.references import (_check_run_dir, as_dict, resolve_references, saved_dict,  # noqa: F401
                                       undefined_lines, undefined_references)  # the recipe API, in one import
from distill.decoding import CODIT_ALPHA
from distill.evaluate.config import EvaluateConfig
from distill.synthesize.config import SynthesizeConfig
from distill.train.config import TrainConfig


@dataclass
class WorldConfig:
    """Build the embedded world (`distill zoo build`) and expose it as ${zoo}."""

    preset: str = "tiny"


@dataclass
class SourceConfig:
    base: str = opt("", "pre-trained source model (the amateur)")
    post: str = opt("", "post-trained source model (the expert); shares base's tokenizer")
    sft_data: Optional[str] = opt(None, "the expert's own post-training data, where it is public (instruction + "
                                        "response rows, any layout `distill train` reads): trains the gold-sft row, "
                                        "the target on the teacher's own SFT data, the text route's ceiling")


@dataclass
class TargetConfig:
    base: str = opt("", "the model that receives instruction-following (any architecture)")


SYNTHESIS_METHODS = ("codit", "direct", "direct-masked", "best-of-n")
# SynthesizeConfig's prompt selection: the recipe's `prompts:` section (T1 reads the same prompts)
PROMPT_KEYS = ("limit", "sample", "prompt_layout", "prompt_turns", "max_prompt_chars", "dedupe", "long_prompts")
# What a stage's settings mean in a recipe: the pipeline fills these fields itself (the run's paths).
FILLED = {
    "synthesis": {"expert": "source.post", "amateur": "source.base", "prompts": "prompts.synthesis",
                  "out": "RUN/data/METHOD", "method": "synthesis.methods"},
    "train": {"model": "target.base", "data": "RUN/data/METHOD (source.sft_data for gold-sft)",
              "out": "RUN/models/METHOD-seedS",
              "seed": "train.seeds"},
    "evaluate": {"model": "each row's model", "out": "RUN/scores/ROW.json"},
    "chat_vector": {"base": "source.base", "post": "source.post", "out": "RUN/chat_vector"},
    "weight_arithmetic": {"target": "weight_arithmetic.target", "out": "RUN/models/weight-arithmetic",
                          "vectors": "RUN/chat_vector with weight_arithmetic.scale"},
}
# A stage resumes with the same settings and starts over with others: the pipeline's stage ran because
# it never finished or its settings changed, so `overwrite` is on by default.
_RERUN = {"overwrite": True}

PromptsConfig = section(
    "PromptsConfig", SynthesizeConfig, keep=PROMPT_KEYS, rename={"prompt_layout": "layout", "prompt_turns": "turns"},
    extra=[("synthesis", str, opt("", "JSONL, a `datasets` directory or a cached hub dataset, in any layout "
                                      "distill.synthesize.prompt_sets reads"))],
    doc="The synthesis prompts and their selection (SynthesizeConfig's prompt options).")
SynthesisConfig = section(
    "SynthesisConfig", SynthesizeConfig, drop=tuple(FILLED["synthesis"]) + PROMPT_KEYS,
    defaults={"alpha": CODIT_ALPHA, **_RERUN}, types={"chat_template_kwargs": Optional[Union[dict, str]]},
    extra=[("methods", list[str], opt(factory=lambda: ["codit", "direct"],
                                      help="codit | direct (plain sampling from the expert) | direct-masked "
                                           "(direct with CoDIT's alpha mask, beta 0: the ablation that separates "
                                           "the mask from the contrast) | best-of-n (synthesis.n direct samples, "
                                           "the one synthesis.judge scores best kept)")),
           ("num_gpus", Optional[int], opt(None, "processes, one per GPU: >1 launches `torchrun --nproc_per_node "
                                                 "N` and the ranks split the prompts (the merged dataset is the "
                                                 "one-process one); null: train.num_gpus; 1: in the pipeline's "
                                                 "own process"))],
    doc="`distill synthesize`'s options (SynthesizeConfig), once per method; alpha is CoDIT's and direct-masked's "
        "(direct uses none).")
TrainStageConfig = section(
    "TrainStageConfig", TrainConfig, drop=tuple(FILLED["train"]), defaults=_RERUN,
    extra=[("seeds", list[int], opt(factory=lambda: [0], help="one trained model per method and seed")),
           ("num_gpus", Optional[int], opt(None, ">1: launch through the `deepspeed` launcher, one process per "
                                                 "GPU; synthesis and evaluate use as many unless their own "
                                                 "num_gpus says otherwise"))],
    doc="`distill train`'s options (TrainConfig), once per method and seed.")
EvaluateStageConfig = section(
    "EvaluateStageConfig", EvaluateConfig, drop=tuple(FILLED["evaluate"]),
    extra=[("num_gpus", Optional[int], opt(None, "processes, one per GPU: >1 launches `torchrun --nproc_per_node "
                                                 "N` and the ranks split the if, knowledge and ppl items (the "
                                                 "scores are the one-process ones); null: train.num_gpus; 1: in "
                                                 "the pipeline's own process"))],
    doc="`distill evaluate`'s options (EvaluateConfig), once per model row.")
# Recipe-only keys that say where a stage runs, not what it writes: no part of its cache key.
PLACEMENT_KEYS = ("num_gpus",)
ChatVectorStageConfig = section("ChatVectorStageConfig", ExtractConfig, drop=tuple(FILLED["chat_vector"]),
                                defaults=_RERUN, doc="`distill chat-vector extract`'s options (ExtractConfig).")
WeightArithmeticConfig = section(
    "WeightArithmeticConfig", ApplyConfig, drop=tuple(FILLED["weight_arithmetic"]), defaults=_RERUN,
    extra=[("target", Optional[str], opt(None, "a same-architecture model (e.g. a continually pre-trained base); "
                                               "null skips the route")),
           ("scale", float, opt(1.0, "λ of target + λ·(post − base)"))],
    doc="Parameter-space route: target + scale · (post − base), `distill chat-vector apply`'s options "
        "(ApplyConfig). Needs the source architecture.")


@dataclass
class TheoryConfig:
    """The theory experiments as recipe stages (`distill.theory`; off by default; each adds loads of
    the models it reads). theory-t1: the source pair linearised along Δ on the synthesis prompts
    (the first `prompts_limit`), into RUN/theory/t1/. theory-t3: the tuned targets' log-ratios
    against the source's on `t3_n` of the run's synthesized responses, into RUN/theory/t3/."""

    t1: bool = False
    t3: bool = False
    prompts_limit: int = 32  # T1: the first N synthesis prompts (prompts.* selects and renders them)
    max_new_tokens: int = 48  # T1: length of the post model's greedy responses
    chunk_tokens: int = 256  # T1: response positions per head/metric chunk (bounds V-sized memory); 0: unchunked
    lambdas: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])  # T1: points θ_base + λΔ
    t3_n: int = 128  # T3: fixed responses, drawn equally from each synthesized dataset (>= 3)
    batch_size: int = 4  # sequences per forward pass (T1 and T3)
    device: Optional[str] = None  # default: CUDA when present
    dtype: Optional[str] = None  # auto (null) | float32 | bfloat16 | float16


@dataclass
class Recipe:
    name: str = "recipe"
    run_dir: str = "runs/${name}"
    world: Optional[WorldConfig] = None
    source: SourceConfig = field(default_factory=SourceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    chat_vector: ChatVectorStageConfig = field(default_factory=ChatVectorStageConfig)
    weight_arithmetic: WeightArithmeticConfig = field(default_factory=WeightArithmeticConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    train: TrainStageConfig = field(default_factory=TrainStageConfig)
    evaluate: EvaluateStageConfig = field(default_factory=EvaluateStageConfig)
    theory: TheoryConfig = field(default_factory=TheoryConfig)


# ----------------------------------------------------------------------------- the stage configs


def synthesize_config(recipe: Recipe, method: str, out: str) -> SynthesizeConfig:
    """The `SynthesizeConfig` of one method's synthesis: the recipe's `synthesis:` and `prompts:`."""
    r, s = recipe, recipe.synthesis
    # direct is plain sampling from the expert (beta 0, no plausibility mask): the baseline;
    # direct-masked keeps CoDIT's mask without the contrast.
    values = stage_values(s) | stage_values(r.prompts)
    values.update(expert=r.source.post, amateur=r.source.base, prompts=r.prompts.synthesis, out=out,
                  method=method if method in ("codit", "best-of-n") else "direct")
    if method in ("direct", "best-of-n"):
        values["alpha"] = None
    elif values["alpha"] is None:
        values["alpha"] = CODIT_ALPHA
    return SynthesizeConfig(**values)


def train_config(recipe: Recipe, data: str, out: str, seed: int) -> TrainConfig:
    return TrainConfig(**stage_values(recipe.train), model=recipe.target.base, data=data, out=out, seed=seed)


def evaluate_config(recipe: Recipe, model: str, out: str) -> EvaluateConfig:
    return EvaluateConfig(**stage_values(recipe.evaluate), model=model, out=out)


def extract_config(recipe: Recipe, out: str) -> ExtractConfig:
    return ExtractConfig(**stage_values(recipe.chat_vector), base=recipe.source.base, post=recipe.source.post, out=out)


def apply_config(recipe: Recipe, vector: str, out: str) -> ApplyConfig:
    wa = recipe.weight_arithmetic
    return ApplyConfig(**stage_values(wa), target=wa.target, out=out, vectors=[(vector, wa.scale)])


# ----------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 3e-4 (no dot) as a string; it is plainly a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _set(data: dict, dotted: str, raw: str, where: str) -> None:
    """Apply one `key.sub=value` override; the value is parsed as YAML (so 3, 0.5, null, [1,2] work)."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise DistillError(f"{where}: --set {dotted}: '{k}' is not a section")
    node[keys[-1]] = yaml_load(raw)


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"recipe {path} not found; see recipes/ for examples")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DistillError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DistillError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise DistillError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=1")
        key, raw = item.split("=", 1)
        _set(data, key.strip(), raw, str(path))
    recipe = validate(Recipe, data, str(path))
    recipe._where, recipe._raw_run_dir = str(path), recipe.run_dir  # not fields: never saved
    recipe.run_dir = recipe.run_dir.replace("${name}", recipe.name)
    if "${zoo}" not in recipe._raw_run_dir:  # else once the world is built (resolve_references)
        _check_run_dir(recipe, {}, str(path))
    unknown = sorted(set(recipe.synthesis.methods) - set(SYNTHESIS_METHODS))
    if unknown:
        raise DistillError(f"{path}: synthesis.methods: unknown {unknown}; use any of {', '.join(SYNTHESIS_METHODS)}")
    _check_values(recipe, str(path))
    return recipe


def _check_values(recipe: Recipe, where: str) -> None:
    """Value ranges, with the stages' own checks, when the recipe loads: not hours later, when
    the stage that reads a bad value finally starts. Each section is made into its stage's config
    (with stand-in paths), which runs that stage's checks."""
    from distill.io.validate import finite
    from distill.train.config import validate as validate_train

    finite(f"{where}: weight_arithmetic.", scale=recipe.weight_arithmetic.scale)
    r = copy.deepcopy(recipe)
    r.source.base = r.source.base or "-"  # codit needs an amateur; the preflight says when it is unset
    checks = {
        "synthesis": lambda: [synthesize_config(r, m, "-") for m in r.synthesis.methods],
        "train": lambda: validate_train(train_config(r, "-", "-", r.train.seeds[0] if r.train.seeds else 0)),
        "evaluate": lambda: evaluate_config(r, "-", "-"),
        "chat_vector": lambda: extract_config(r, "-"),
        "weight_arithmetic": lambda: apply_config(r, "-", "-"),
    }
    for key, check in checks.items():
        try:
            check()
        except DistillError as exc:
            raise DistillError(f"{where}: {key}: {exc}") from None
    for key in ("synthesis", "evaluate"):
        n = getattr(recipe, key).num_gpus
        if n is not None and n < 1:
            raise DistillError(f"{where}: {key}.num_gpus must be >= 1 (or null: train.num_gpus), got {n}")
    th = recipe.theory
    for key, low in (("prompts_limit", 1), ("max_new_tokens", 1), ("chunk_tokens", 0), ("t3_n", 3),
                     ("batch_size", 1)):
        if getattr(th, key) < low:
            raise DistillError(f"{where}: theory.{key} must be >= {low}, got {getattr(th, key)}")
    if th.dtype not in (None, "auto", "float32", "bfloat16", "float16"):
        raise DistillError(f"{where}: theory.dtype must be auto, float32, bfloat16 or float16, got {th.dtype!r}")
