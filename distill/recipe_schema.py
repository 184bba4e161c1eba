"""The recipe file: one typed schema, validated, with `--set key=value` overrides.

A recipe names the source pair, the target, the prompts and every setting of every stage.
Unknown keys and wrong types are errors that name the key and the file. Strings may refer
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
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from distill import DistillError


@dataclass
class WorldConfig:
    """Build the embedded world (`distill zoo build`) and expose it as ${zoo}."""

    preset: str = "tiny"


@dataclass
class SourceConfig:
    base: str = ""  # pre-trained source model (the amateur)
    post: str = ""  # post-trained source model (the expert); shares base's tokenizer


@dataclass
class TargetConfig:
    base: str = ""  # the model that receives instruction-following (any architecture)


@dataclass
class WeightArithmeticConfig:
    """Parameter-space route: target + scale * (post - base). Needs the source architecture."""

    target: Optional[str] = None  # a same-architecture model (e.g. a continually pre-trained base); null skips
    scale: float = 1.0
    skip_embeddings: bool = False


@dataclass
class PromptsConfig:
    # JSONL, a `datasets` directory or a cached hub dataset, in any layout distill.prompt_sets reads
    synthesis: str = ""
    limit: Optional[int] = None  # use the first N prompts only
    sample: Optional[int] = None  # or N prompts drawn with synthesis.seed
    layout: str = "auto"  # auto | instruction | messages | conversation | sharegpt | alpaca
    turns: str = "first"  # first user turn | all turns up to the last user turn
    max_prompt_chars: Optional[int] = 16000
    dedupe: bool = True


SYNTHESIS_METHODS = ("codit", "direct", "direct-masked")


@dataclass
class SynthesisConfig:
    # codit | direct (plain sampling from the expert) | direct-masked (direct with CoDIT's alpha mask,
    # beta 0: the ablation that separates the mask from the contrast)
    methods: list[str] = field(default_factory=lambda: ["codit", "direct"])
    alpha: float = 0.01  # CoDIT's plausibility threshold (and direct-masked's); direct uses none
    beta: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096  # the public CoDIT scripts' max_tokens
    batch_size: int = 32
    seed: int = 0
    device: Optional[str] = None
    dtype: Optional[str] = None
    chat_template: Optional[str] = None  # for an expert without one: a .jinja file or the template text
    chat_template_kwargs: Optional[dict] = None  # e.g. {enable_thinking: false}; a template reading it gets false
    token_logprobs: bool = False  # store each chosen token's log_softmax(score)
    repetition_rule: str = "public"  # which rows are flagged repetitive: public (the CoDIT code's) | ngram


@dataclass
class TrainStageConfig:
    deepspeed: Optional[str] = "zero2"  # zero2 | zero3 | zero3_offload | path to a JSON; null: no DeepSpeed
    epochs: float = 3.0
    max_steps: int = -1
    lr: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 2048
    truncation: str = "drop"  # rows longer than max_length: drop | truncate
    repetitive: str = "drop"  # rows synthesis flagged `repetitive: true`: drop | keep (`distill train --repetitive`)
    packing: bool = False
    gradient_checkpointing: bool = False
    seeds: list[int] = field(default_factory=lambda: [0])
    num_gpus: Optional[int] = None  # >1: launch through the `deepspeed` launcher


@dataclass
class EvaluateConfig:
    zoo: Optional[str] = None  # a directory of the world's layout (eval prompts, knowledge, held-out text)
    suites: list[str] = field(default_factory=lambda: ["if", "knowledge", "ppl"])
    batch_size: int = 32
    max_new_tokens: int = 256
    limit: Optional[int] = None
    device: Optional[str] = None


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
    weight_arithmetic: WeightArithmeticConfig = field(default_factory=WeightArithmeticConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    train: TrainStageConfig = field(default_factory=TrainStageConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    theory: TheoryConfig = field(default_factory=TheoryConfig)


def _check(value: Any, tp: Any, key: str, where: str) -> Any:
    """Validate (and lightly coerce: int -> float, "3e-4" -> float) one value against a type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0], key, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DistillError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, where, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise DistillError(f"{where}: '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value.strip()):
        return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; it is plainly a number
    if tp is dict and not isinstance(value, dict):
        raise DistillError(f"{where}: '{key}' must be a mapping, got {value!r}")
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise DistillError(f"{where}: '{key}' must be {tp.__name__}, got {value!r}")
    return value


def _from_dict(cls, data: dict, where: str, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DistillError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(prefix + k for k in unknown)}; known keys: {', '.join(sorted(prefix + n for n in names))}"
        )
    return cls(**{k: _check(v, hints[k], prefix + k, where) for k, v in data.items()})


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
    node[keys[-1]] = yaml.safe_load(raw)


_REF = re.compile(r"\$\{(\w+)\}")
RUNS_ROOT = "runs"  # where a relative run_dir must stay (see the module docstring)


def _interpolate(obj, env: dict[str, str], key: str = "", found: dict | None = None):
    """Fill references: `env` (${zoo}, ${run_dir}, ${name}) first, then environment variables.

    `found` collects "undefined" [(key, variable)] (left as written) and "written" {key: the value
    with only `env` filled}, for each value that took something from the environment."""
    found = found if found is not None else {"undefined": [], "written": {}}
    if isinstance(obj, str):
        from_environ = False

        def fill(m):
            nonlocal from_environ
            var = m.group(1)
            if var in env:
                return env[var]
            if var in os.environ:
                from_environ = True
                return os.environ[var]
            found["undefined"].append((key, var))
            return m.group(0)

        value = _REF.sub(fill, obj)
        if from_environ:
            found["written"][key] = _REF.sub(lambda m: env.get(m.group(1), m.group(0)), obj)
        return value
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            sub = f"{key}.{f.name}" if key else f.name
            setattr(obj, f.name, _interpolate(getattr(obj, f.name), env, sub, found))
        return obj
    if isinstance(obj, list):
        return [_interpolate(v, env, f"{key}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def undefined_message(key: str, var: str, value: str) -> str:
    """One line naming an undefined reference, its key and the fix."""
    if var == "zoo":
        return (f"{key} = {value}: ${{zoo}} is undefined: the recipe has no `world:` section to build one; add "
                f"`world: {{preset: tiny}}` or pass --set {key}=PATH")
    return (f"{key} = {value}: ${{{var}}} is undefined: the environment variable {var} is not set; set it, or "
            f"pass --set {key}=VALUE")


def _confine_run_dir(raw: str, resolved: str, where: str) -> None:
    """A relative run_dir stays under RUNS_ROOT; an absolute one as written (see the module docstring)."""
    head = raw
    lead = _REF.match(raw)
    if lead and lead.group(1) not in ("name", "run_dir", "zoo") and lead.group(1) in os.environ:
        head = os.environ[lead.group(1)] + raw[lead.end():]  # the user's own environment: as written
    head = os.path.expanduser(head)
    target = os.path.normpath(os.path.expanduser(resolved))
    if os.path.isabs(head):
        literal = head.split("${", 1)[0]
        root = os.path.normpath(literal if "${" not in head else (os.path.dirname(literal) or "/"))
        inside = target == root or target.startswith(root.rstrip("/") + "/")
    else:
        root = RUNS_ROOT
        inside = target.startswith(RUNS_ROOT + "/") and not os.path.isabs(target)
    if not inside:
        raise DistillError(f"{where}: run_dir {resolved!r} (from {raw!r}) leaves {root}/; a run directory stays "
                           f"under {root}/ - use a plain `name`, or write an absolute run_dir: --set run_dir=/abs/path")


def _check_run_dir(recipe: "Recipe", env: dict[str, str], where: str) -> None:
    raw = getattr(recipe, "_raw_run_dir", recipe.run_dir)
    found = {"undefined": [], "written": {}}
    resolved = _interpolate(raw, {"name": recipe.name, **env}, "run_dir", found)
    if not found["undefined"]:
        _confine_run_dir(raw, resolved, where)


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"recipe {path} not found; see recipes/ for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DistillError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DistillError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise DistillError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=1")
        key, raw = item.split("=", 1)
        _set(data, key.strip(), raw, str(path))
    recipe = _from_dict(Recipe, data, str(path))
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
    the stage that reads a bad value finally starts."""
    from distill.decoding import DecodingConfig
    from distill.train import TrainConfig, validate

    s, t = recipe.synthesis, recipe.train
    try:
        DecodingConfig(alpha=s.alpha, beta=s.beta, temperature=s.temperature, top_p=s.top_p,
                       max_new_tokens=s.max_new_tokens, batch_size=s.batch_size).validate()
    except DistillError as exc:
        raise DistillError(f"{where}: synthesis: {exc}") from None
    try:
        validate(TrainConfig(model="", data="", out="", epochs=t.epochs, max_steps=t.max_steps, lr=t.lr,
                              batch_size=t.batch_size, grad_accum=t.grad_accum, max_length=t.max_length,
                              truncation=t.truncation, repetitive=t.repetitive))
    except DistillError as exc:
        raise DistillError(f"{where}: train: {exc}") from None
    from distill.evaluate import EvaluateConfig as EvaluateStage
    from distill.validate import finite

    finite(f"{where}: weight_arithmetic.", scale=recipe.weight_arithmetic.scale)
    e = recipe.evaluate
    try:
        EvaluateStage(suites=tuple(e.suites), batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, limit=e.limit)
    except DistillError as exc:
        raise DistillError(f"{where}: evaluate: {exc}") from None
    th = recipe.theory
    for key, low in (("prompts_limit", 1), ("max_new_tokens", 1), ("chunk_tokens", 0), ("t3_n", 3),
                     ("batch_size", 1)):
        if getattr(th, key) < low:
            raise DistillError(f"{where}: theory.{key} must be >= {low}, got {getattr(th, key)}")
    if th.dtype not in (None, "auto", "float32", "bfloat16", "float16"):
        raise DistillError(f"{where}: theory.dtype must be auto, float32, bfloat16 or float16, got {th.dtype!r}")


def resolve_references(recipe: Recipe, zoo: str | None, undefined: str = "error") -> Recipe:
    """Fill ${zoo}, ${run_dir}, ${name} and environment variables once the world (if any) is built.

    An undefined reference is an error naming it, the file and the key; `undefined="keep"` leaves
    them as written and lists them in `undefined_references(recipe)` (`distill run`'s preflight
    reports them with every other missing input)."""
    where = getattr(recipe, "_where", "recipe")
    env = {"name": recipe.name}
    if zoo:
        env["zoo"] = str(zoo)
    found = {"undefined": [], "written": {}}
    recipe = copy.deepcopy(recipe)
    recipe.run_dir = _interpolate(recipe.run_dir, env, "run_dir", found)
    env["run_dir"] = recipe.run_dir
    _interpolate(recipe, env, "", found)
    if not any(k == "run_dir" for k, _ in found["undefined"]):
        _check_run_dir(recipe, env, where)
    recipe._undefined, recipe._written = list(dict.fromkeys(found["undefined"])), found["written"]
    if recipe._undefined and undefined != "keep":
        key, var = recipe._undefined[0]
        more = f" (and {len(recipe._undefined) - 1} more)" if len(recipe._undefined) > 1 else ""
        raise DistillError(f"{where}: {undefined_message(key, var, _get(as_dict(recipe), key))}{more}")
    return recipe


def undefined_references(recipe: Recipe) -> list[tuple[str, str]]:
    """[(key, variable)] of the references `resolve_references(..., undefined="keep")` could not fill."""
    return list(getattr(recipe, "_undefined", []))


def undefined_lines(recipe: Recipe, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{key: one line naming its undefined reference and the fix}, for the keys not in `skip`."""
    data, lines = as_dict(recipe), {}
    for key, var in undefined_references(recipe):
        if key not in lines and key not in skip:
            lines[key] = undefined_message(key, var, _get(data, key))
    return lines


def as_dict(recipe: Recipe) -> dict:
    """Every setting as resolved: what the stages use (and what their cache keys hash)."""
    return dataclasses.asdict(recipe)


def saved_dict(recipe: Recipe) -> dict:
    """The recipe to save in files (recipe.json, the report): as `as_dict`, but a value taken from
    the environment is written back as its reference (`${DISTILL_PROMPTS}`), as the user wrote it."""
    data = as_dict(recipe)
    for key, written in getattr(recipe, "_written", {}).items():
        _put(data, key, written)
    return data


def _path(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]\.?", key) if p != ""]


def _get(data, key: str):
    for part in _path(key):
        data = data[part]
    return data


def _put(data, key: str, value) -> None:
    *parents, last = _path(key)
    for part in parents:
        data = data[part]
    data[last] = value
