"""One typed config per stage: the dataclass is the stage's options, defaults and help, all at once.

- the command line is generated from it by `transformers.HfArgumentParser` (`add_arguments`):
  `--max-new-tokens` and `--max_new_tokens`, `--no-X` for a setting that is on by default, a
  Literal's values as choices, the field's `help` metadata with its default;
- the recipe's stage section is a `section()` of it: the same fields (minus those the pipeline
  fills in, e.g. the model paths), the same defaults and help, plus the recipe-only keys;
- values are validated by pydantic (`validate`), strictly (a YAML `8` is an int, `"8"` is not),
  and the stage's own `__post_init__` checks run on the result, so a recipe fails on load with
  the error the stage would give hours later.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from dataclasses import MISSING, Field
from typing import Any

from distill import DistillError


def opt(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, aliases: tuple[str, ...] = (),
        metavar: str | None = None, cli: bool = True) -> Field:
    """A config field with its help text (and old CLI spellings as `aliases`). `cli=False`: a setting
    only the Python API and recipes set (never a flag)."""
    meta: dict[str, Any] = {"help": help}
    if aliases:
        meta["aliases"] = list(aliases)
    if metavar:
        meta["metavar"] = metavar
    if not cli:
        meta["cli"] = False
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional_bool(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and \
        set(typing.get_args(tp)) == {bool, type(None)}


def _is_list(tp) -> bool:
    tp = _strip_optional(tp)
    return typing.get_origin(tp) in (list, tuple)


def _is_int_or_word(tp) -> bool:
    """int | str: a number, or a word such as "auto" (HfArgumentParser alone would parse it as int)."""
    return typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and \
        set(typing.get_args(tp)) == {int, str}


def _int_or_word(value: str):
    return int(value) if value.lstrip("-").isdigit() else value


def _strip_optional(tp):
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return tp


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (examples keep their lines); every option's set default shown."""

    def _get_help_string(self, action):
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser, cls, *, optional: tuple[str, ...] = ()) -> None:
    """Add one flag per CLI field of `cls` through HfArgumentParser's own field parser.

    `optional`: fields without a default that this command may leave unset (it checks them itself,
    e.g. `synthesize --merge D` needs no --expert)."""
    from transformers import HfArgumentParser

    types = hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        meta = {**f.metadata, "help": f.metadata.get("help", "").replace("%", "%%")}  # argparse formats help
        meta.pop("cli", None)
        g = dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=meta)
        g.name, g.type = f.name, types[f.name]
        if f.name in optional and f.default is MISSING and f.default_factory is MISSING:
            g.default = None
        if _is_optional_bool(g.type):
            # a tri-state switch (None: decided at run time): `--X` alone means true, `--no-X` false
            g = dataclasses.field(default=g.default, metadata={**g.metadata, "nargs": "?", "const": True})
            g.name, g.type = f.name, types[f.name]
        HfArgumentParser._parse_dataclass_field(parser, g)
        if _is_optional_bool(types[f.name]):
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", f"--no_{f.name}", dest=f.name,
                                action="store_false", help=argparse.SUPPRESS)
        for action in parser._actions:
            if action.dest == f.name:
                if f.name in optional:
                    action.required = False
                if _is_int_or_word(types[f.name]):
                    action.type = _int_or_word


def from_args(cls, args: argparse.Namespace, **values):
    """The config a parsed command line gives (list flags also accept comma-separated values)."""
    types = hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        if _is_list(types[f.name]) and isinstance(v, (list, tuple)):
            v = [p for item in v for p in (item.split(",") if isinstance(item, str) else [item]) if p != ""]
        kwargs[f.name] = v
    return cls(**(kwargs | values))


def config_flags(cfg) -> list[str]:
    """The flags of `cfg`'s command that give `cfg` back through `add_arguments` + `from_args` (what a
    launcher passes to each process): every CLI field whose value is not its default, the required
    ones always, in field order. A value no flag can say (None where the default is not) is left out;
    parsing the flags back shows it (`distill.recipe.launch.stage_flags`)."""
    flags = []
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("cli", True):
            continue
        v = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if (default is not MISSING and v == default) or v is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + f.name.replace("_", "-"))
        elif isinstance(v, (list, tuple)):
            flags += [flag, *map(str, v)] if v else []  # an empty list: no flag takes none, parsing back says so
        elif isinstance(v, dict):
            flags += [flag, json.dumps(v, sort_keys=True)]
        else:
            flags += [flag, str(v)]
    return flags


def section(name: str, cls, *, drop: tuple[str, ...] = (), rename: dict[str, str] | None = None,
            keep: tuple[str, ...] | None = None, defaults: dict[str, Any] | None = None,
            types: dict[str, Any] | None = None, extra: list[tuple[str, Any, Field]] = (), doc: str = ""):
    """A recipe section made from a stage config: its fields (all, or `keep`, minus `drop`), renamed
    as `rename` says, with their types, defaults and help, plus `extra` recipe-only fields. The
    section's `stage_fields` maps each of its fields back to the stage config's name."""
    rename, defaults, types = rename or {}, defaults or {}, types or {}
    src = hints(cls)
    out, back = [], {}
    for f in dataclasses.fields(cls):
        if f.name in drop or (keep is not None and f.name not in keep):
            continue
        new = rename.get(f.name, f.name)
        if new in defaults:
            g = dataclasses.field(default=defaults[new], metadata=f.metadata)
        elif f.default_factory is not MISSING:
            g = dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
        elif f.default is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name} has no default; drop it from section {name}")
        else:
            g = dataclasses.field(default=f.default, metadata=f.metadata)
        out.append((new, types.get(new, src[f.name]), g))
        back[new] = f.name
    out.extend(extra)
    made = dataclasses.make_dataclass(name, out)
    made.__doc__ = doc or f"The recipe's section for {cls.__name__}."
    made.stage_fields = back  # section key -> stage config field
    made.__module__ = cls.__module__
    return made


def stage_values(sec) -> dict[str, Any]:
    """{stage config field: value} of a recipe section made by `section()`."""
    return {stage: getattr(sec, key) for key, stage in type(sec).stage_fields.items()}


# ----------------------------------------------------------------------------- validation


def validate(cls, data: dict, where: str, prefix: str = ""):
    """`cls(**data)`, every value type-checked strictly by pydantic, each error one line naming the
    key, the file and the fix; unknown keys are listed with the known ones."""
    from pydantic import ConfigDict, TypeAdapter, ValidationError

    _forbid_extra(cls, ConfigDict)
    try:
        return TypeAdapter(cls).validate_json(json.dumps(data, default=_not_json(where, prefix)), strict=True)
    except ValidationError as exc:
        raise DistillError(_message(exc.errors(), cls, where, prefix)) from None


def _not_json(where: str, prefix: str):
    def refuse(value):
        raise DistillError(f"{where}: {prefix.rstrip('.') or 'a value'}: {value!r} is not a plain YAML value "
                           f"(string, number, boolean, list or mapping)")
    return refuse


def _forbid_extra(cls, ConfigDict) -> None:
    if dataclasses.is_dataclass(cls) and "__pydantic_config__" not in cls.__dict__:
        cls.__pydantic_config__ = ConfigDict(extra="forbid")
        for tp in hints(cls).values():
            for inner in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(inner):
                    _forbid_extra(inner, ConfigDict)


_KINDS = {"int_type": "int", "int_parsing": "int", "float_type": "float", "float_parsing": "float",
          "string_type": "str", "bool_type": "bool", "bool_parsing": "bool", "list_type": "a list",
          "dict_type": "a mapping", "dataclass_type": "a mapping", "dataclass_exact_type": "a mapping",
          "int_from_float": "int"}


def _key(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not re.fullmatch(r"function-\w+\[.*\]|\w+\[.*\]|none|is-instance\[.*\]", str(part)) or not out:
            out += ("." if out else "") + str(part)
    return out


def _message(errors: list[dict], cls, where: str, prefix: str) -> str:
    unknown = [e for e in errors if e["type"] in ("unexpected_keyword_argument", "extra_forbidden")]
    if unknown:
        keys = sorted({prefix + _key(e["loc"]) for e in unknown})
        parent = keys[0].rsplit(".", 1)[0] + "." if "." in keys[0] else ""
        known = sorted(parent + n for n in _known(cls, parent[len(prefix):]))
        return (f"{where}: unknown key{'s' if len(keys) > 1 else ''} {', '.join(keys)}; "
                f"known keys: {', '.join(known)}")
    # One error per key: a value of an Optional[X] field gives one error per branch of the union.
    e = next((e for e in errors if e["type"] in _KINDS), errors[0])
    key = prefix + _key(e["loc"])
    if e["type"] == "literal_error":  # as the stages say it: "train: repetitive must be drop or keep, got 'x'"
        choices = re.findall(r"'([^']*)'", e["ctx"]["expected"])
        said = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
        head, _, name = key.rpartition(".")
        return f"{where}: {head + ': ' if head else ''}{name} must be {said}, got {e['input']!r}"
    if e["type"] == "missing_argument" or e["type"] == "missing":
        return f"{where}: '{key}' is required"
    kind = _KINDS.get(e["type"])
    if kind:
        return f"{where}: '{key}' must be {kind}, got {e['input']!r}"
    return f"{where}: '{key}': {e['msg']}, got {e.get('input')!r}"


def _known(cls, dotted: str) -> list[str]:
    for part in filter(None, dotted.rstrip(".").split(".")):
        cls = _strip_optional(hints(cls)[part])
    return [f.name for f in dataclasses.fields(cls)]
