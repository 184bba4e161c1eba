"""References in a recipe (`${zoo}`, `${run_dir}`, `${name}`, environment variables) and the run
directory's confinement; the rules are in distill.recipe.schema's docstring."""

from __future__ import annotations

import copy
import dataclasses
import os
import re

from distill import DistillError


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


def _check_run_dir(recipe, env: dict[str, str], where: str) -> None:
    raw = getattr(recipe, "_raw_run_dir", recipe.run_dir)
    found = {"undefined": [], "written": {}}
    resolved = _interpolate(raw, {"name": recipe.name, **env}, "run_dir", found)
    if not found["undefined"]:
        _confine_run_dir(raw, resolved, where)


def resolve_references(recipe, zoo: str | None, undefined: str = "error"):
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


def undefined_references(recipe) -> list[tuple[str, str]]:
    """[(key, variable)] of the references `resolve_references(..., undefined="keep")` could not fill."""
    return list(getattr(recipe, "_undefined", []))


def undefined_lines(recipe, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{key: one line naming its undefined reference and the fix}, for the keys not in `skip`."""
    data, lines = as_dict(recipe), {}
    for key, var in undefined_references(recipe):
        if key not in lines and key not in skip:
            lines[key] = undefined_message(key, var, _get(data, key))
    return lines


def as_dict(recipe) -> dict:
    """Every setting as resolved: what the stages use (and what their cache keys hash)."""
    return dataclasses.asdict(recipe)


def saved_dict(recipe) -> dict:
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
