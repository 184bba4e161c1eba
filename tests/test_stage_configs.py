"""Every option of every stage, from both doors: each field of each stage config is a flag of its
command (with help) and a key of the recipe (or filled from the recipe's paths), and a value set
either way reaches the config the stage runs with."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from distill.chat_vector.core import ApplyConfig, ExtractConfig
from distill.config import hints
from distill.evaluate.run import EvaluateConfig
from distill.recipe.schema import (FILLED, apply_config, evaluate_config, extract_config, load_recipe,
                                   synthesize_config, train_config)
from distill.synthesize.run import SynthesizeConfig
from distill.train.run import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "mistral-to-qwen.yaml"


def _parser(module: str, command: str, *sub: str) -> argparse.ArgumentParser:
    import importlib

    top = argparse.ArgumentParser()
    importlib.import_module(module).add_cli(top.add_subparsers(dest="command"))
    parser = top._subparsers._group_actions[0].choices[command]
    for name in sub:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


# (config, its parser, recipe section, build the stage config from a loaded recipe)
STAGES = {
    "synthesize": (SynthesizeConfig, lambda: _parser("distill.synthesize.cli", "synthesize"), "synthesis",
                   lambda r: synthesize_config(r, "codit", "OUT")),
    "train": (TrainConfig, lambda: _parser("distill.train.cli", "train"), "train",
              lambda r: train_config(r, "DATA", "OUT", r.train.seeds[0])),
    "evaluate": (EvaluateConfig, lambda: _parser("distill.evaluate.cli", "evaluate"), "evaluate",
                 lambda r: evaluate_config(r, "MODEL", "OUT")),
    "chat-vector extract": (ExtractConfig, lambda: _parser("distill.chat_vector.cli", "chat-vector", "extract"),
                            "chat_vector", lambda r: extract_config(r, "OUT")),
    "chat-vector apply": (ApplyConfig, lambda: _parser("distill.chat_vector.cli", "chat-vector", "apply"),
                          "weight_arithmetic", lambda r: apply_config(r, "VECTOR", "OUT")),
}
# Values some fields need to be valid (a free string elsewhere is "x-<field>")
VALID = {"deepspeed": "zero3", "lr_scheduler": "linear", "attn_implementation": "eager", "device": "cpu",
         "max_shard_size": "1GB", "chat_template_kwargs": '{"enable_thinking": true}', "suites": ["knowledge"],
         "lm_eval_tasks": ["arc_easy"], "alpha": 0.2, "top_p": 0.9, "warmup_ratio": 0.2, "eval_fraction": 0.2,
         "repetition_threshold": 0.4, "temperature": 0.7}
# A field given on the command line in another shape than one flag of its own name
CLI_SHAPE = {("chat-vector apply", "vectors"): ("--vector", "--scale")}
# Where the recipe puts the fields the pipeline fills (FILLED): the key a test can set, or None when
# the value is the run's own path
RECIPE_KEY = {"source.post": "source.post", "source.base": "source.base", "target.base": "target.base",
              "prompts.synthesis": "prompts.synthesis", "weight_arithmetic.target": "weight_arithmetic.target"}
PROMPT_RENAMES = {"prompt_layout": "layout", "prompt_turns": "turns"}
# An older spelling the config folds into the canonical field when it is made
FOLDED = {"keep_repetitive": ("repetitive", "keep")}


def _check(cfg, name, value, *context):
    if name in FOLDED and value:
        name, value = FOLDED[name]
    assert getattr(cfg, name) == value, (*context, name, value, getattr(cfg, name))


def _other(name: str, tp, default):
    """A valid value of type `tp` that is not `default`."""
    if name in VALID and VALID[name] != default:
        return VALID[name]
    tp = _inner(tp)
    if typing.get_origin(tp) is typing.Literal:
        return next(c for c in typing.get_args(tp) if c != default and c != "auto") if len(typing.get_args(tp)) > 1 \
            else typing.get_args(tp)[0]
    if tp is bool:
        return not default if default is not None else True
    if tp is int:
        return (default or 0) + 3 if (default or 0) >= 0 else 5
    if tp is float:
        return (default or 0.0) + 0.5
    if tp is str:
        return f"x-{name}"
    if set(typing.get_args(tp)) == {int, str}:  # a number or a word ("auto"): the number shape
        return 7 if default != 7 else 8
    raise AssertionError(f"no test value for {name}: {tp}")


def _inner(tp):
    args = typing.get_args(tp)
    if type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


def _fields(cls):
    return [(f, hints(cls)[f.name], f.default if f.default is not dataclasses.MISSING else
             (f.default_factory() if f.default_factory is not dataclasses.MISSING else None))
            for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_field_is_a_flag_with_help_and_the_flag_sets_it(stage):
    cls, parser, _, _ = STAGES[stage]
    parser = parser()
    actions = {}
    for a in parser._actions:  # the field's own flag, not its --no-X complement
        actions.setdefault(a.dest, a)
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    base = [x for name in required for x in (f"--{name.replace('_', '-')}", f"x-{name}")]
    for f, tp, default in _fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        if (stage, f.name) in CLI_SHAPE:
            for flag in CLI_SHAPE[stage, f.name]:
                assert flag in parser._option_string_actions and parser._option_string_actions[flag].help
            continue
        assert f.name in actions, f"`distill {stage}` has no flag for {cls.__name__}.{f.name}"
        assert actions[f.name].help == f.metadata["help"].replace("%", "%%")
        if f.name in required:
            continue
        value = _other(f.name, tp, default)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            argv = [flag] if value else [f"--no-{f.name.replace('_', '-')}"]
        elif isinstance(value, list):
            argv = [flag, *map(str, value)]
        else:
            argv = [flag, str(value)]
        extra = {"chat-vector apply": ["--vector", "v"], "synthesize": ["--amateur", "a"]}.get(stage, [])
        if f.name == "amateur":
            extra = []
        args = parser.parse_args(base + extra + argv)
        from distill.config import from_args

        kwargs = {"vectors": [("v", 1.0)]} if stage == "chat-vector apply" else {}
        cfg = from_args(cls, args, **kwargs)
        _check(cfg, f.name, value, stage, argv)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_field_is_set_by_the_recipe(stage, tmp_path, monkeypatch):
    cls, _, section, build = STAGES[stage]
    monkeypatch.setenv("DISTILL_PROMPTS", str(tmp_path / "prompts.jsonl"))
    filled = FILLED[section if section != "synthesis" else "synthesis"]
    base_sets = ["weight_arithmetic.target=/wa"]
    for f, tp, default in _fields(cls):
        if f.name in filled:
            where = filled[f.name]
            if where in RECIPE_KEY:  # a path the recipe names: set it there
                r = load_recipe(RECIPE, base_sets + [f"{RECIPE_KEY[where]}=/set/{f.name}"])
                assert getattr(build(r), f.name) == f"/set/{f.name}", (stage, f.name)
            else:  # the run's own path or the per-row/method/seed loop: the pipeline's, by design
                assert re.match(r"(RUN/|each |synthesis\.methods|train\.seeds)", where), (f.name, where)
            continue
        if section == "synthesis" and f.name in ("limit", "sample", "prompt_layout", "prompt_turns",
                                                  "max_prompt_chars", "dedupe", "long_prompts"):
            key = f"prompts.{PROMPT_RENAMES.get(f.name, f.name)}"
        else:
            key = f"{section}.{f.name}"
        recipe_default = getattr(load_recipe(RECIPE, base_sets), section)
        current = getattr(recipe_default, key.split(".", 1)[1]) if not key.startswith("prompts.") else \
            getattr(load_recipe(RECIPE, base_sets).prompts, key.split(".", 1)[1])
        value = _other(f.name, tp, current)
        if f.name == "prompt_layout":
            value = "alpaca"
        import json

        r = load_recipe(RECIPE, base_sets + [f"{key}={json.dumps(value)}"])
        _check(build(r), f.name, value, stage, key)


def test_a_recipe_sections_defaults_and_help_are_its_stages():
    from distill.recipe.schema import Recipe

    sections = {"synthesis": SynthesizeConfig, "train": TrainConfig, "evaluate": EvaluateConfig,
                "chat_vector": ExtractConfig, "weight_arithmetic": ApplyConfig}
    recipe = Recipe()
    for section, cls in sections.items():
        sec = getattr(recipe, section)
        stage = {f.name: f for f in dataclasses.fields(cls)}
        for key, name in type(sec).stage_fields.items():
            sf = next(f for f in dataclasses.fields(type(sec)) if f.name == key)
            assert sf.metadata["help"] == stage[name].metadata["help"]
            if key not in ("overwrite", "alpha"):  # the recipe resumes/replaces; alpha is CoDIT's there
                d = stage[name].default if stage[name].default is not dataclasses.MISSING else \
                    stage[name].default_factory()
                assert getattr(sec, key) == d, (section, key)


def test_a_recipe_reproduces_the_readmes_fastest_training_command(tmp_path, monkeypatch):
    """recipes/one-gpu-fast.yaml's training stage runs exactly the README's fastest command."""
    import shlex

    from distill.recipe.pipeline import train_command

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```\n(distill train --model T[^`]*?)```", readme).group(1)
    expected = shlex.split(block.replace("\\\n", " "))
    monkeypatch.setenv("DISTILL_PROMPTS", str(tmp_path / "prompts.jsonl"))
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU recipe: FlexAttention trains on one only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    r = load_recipe(ROOT / "recipes" / "one-gpu-fast.yaml")
    r.target.base = "T"
    assert train_command(train_config(r, "D", "M", r.train.seeds[0])) == expected
