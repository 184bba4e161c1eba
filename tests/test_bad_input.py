"""Bad input, table-driven: each row is a command line that must fail the same way.

Every row exits with status 2 (a DistillError), prints ONE line on stderr (`distill CMD: error:
...`, the last line) that contains the row's fragment (the file or flag, and the fix), shows no
traceback, and leaves its output path absent. Rows cover issue 22's cases and the ones that
already held (so they keep holding). Runs in-process through `distill.cli.main`; disk-full and
permission errors are injected by monkeypatching the call that writes.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from distill.cli import main
from tiny import make_model, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

UNDEF = "DISTILL_TEST_UNDEFINED_VARIABLE"


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Tiny models (post/base share a tokenizer, `other` has another) and every bad input file."""
    from distill.chat_vector.core import extract

    d = tmp_path_factory.mktemp("bad-input")
    tok = make_tokenizer()
    make_model(d / "post", seed=0, tokenizer=tok)
    make_model(d / "base", seed=1, tokenizer=tok)
    make_model(d / "other", seed=2, tokenizer=make_tokenizer(vocab_size=120))
    extract(d / "base", d / "post", d / "cv", progress=False)
    (d / "trunc").mkdir()
    for f in (d / "post").iterdir():
        shutil.copy(f, d / "trunc" / f.name)
    weights = (d / "trunc" / "model.safetensors").read_bytes()
    (d / "trunc" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(d / "post", d / "badcfg")
    (d / "badcfg" / "config.json").write_text("{not json")
    shutil.copytree(d / "post", d / "listcfg")
    (d / "listcfg" / "config.json").write_text("[]")
    shutil.copytree(d / "post", d / "badtok")
    (d / "badtok" / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')

    def jsonl(name, *rows):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("prompts.jsonl", *[{"id": f"q{i}", "instruction": f"the quick brown fox {i}"} for i in range(3)])
    jsonl("nocontent.jsonl", {"id": "a", "messages": [{"role": "user"}]})
    jsonl("huge.jsonl", {"id": "big", "instruction": "fox " * 250_000})  # 1 MB
    jsonl("long.jsonl", {"id": "short", "instruction": "the fox"}, {"id": "long", "instruction": "fox " * 1000})
    jsonl("train.jsonl", {"instruction": "hi", "response": "there"})
    jsonl("train_nocontent.jsonl", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]})
    (d / "empty.jsonl").write_text("")
    (d / "emptyds" / "data").mkdir(parents=True)
    (d / "emptyds" / "data" / "train.jsonl").write_text("")
    import datasets

    datasets.Dataset.from_dict({"instruction": [], "response": []}).save_to_disk(str(d / "emptysaved"))
    jsonl("eval.jsonl", {"id": "e0", "instruction": "say hi", "constraints": []})
    jsonl("eval_null.jsonl", {"id": "e0", "instruction": None, "constraints": []})
    (d / "afile").write_text("not a directory")
    return d


def _recipe(w: Path, name: str, extra: str = "", **sections) -> str:
    """A recipe on the tiny models that would run, with the top-level keys of `extra` (YAML) replacing
    its own; without a run_dir of its own (but with a name) it gets the default runs/${name}."""
    import yaml

    data = {"run_dir": f"{w}/out/run", "source": {"base": f"{w}/base", "post": f"{w}/post"},
            "target": {"base": f"{w}/base"}, "prompts": {"synthesis": f"{w}/prompts.jsonl"}, **sections}
    changes = yaml.safe_load(extra.format(w=w)) or {}
    if "name" in changes and "run_dir" not in changes:
        del data["run_dir"]
    path = w / "recipes" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data | changes, sort_keys=False))
    return str(path)


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


def _replace_fails(code):
    """os.replace (every atomic write's rename) fails with `code`, naming its target."""
    import os

    def replace(src, dst):
        raise OSError(code, os.strerror(code), str(dst))

    return lambda mp, w: mp.setattr("os.replace", replace)


SYN = "synthesize --expert {w}/post --amateur {w}/base --prompts {w}/prompts.jsonl --out {w}/out/syn --no-progress"
EV = "evaluate --model {w}/post --prompts {w}/eval.jsonl --suite if --max-new-tokens 2 --out {w}/out/ev.json"
TR = "train --model {w}/post --data {w}/train.jsonl --out {w}/out/tr --deepspeed none --max-steps 1"
APPLY = "chat-vector apply --target {w}/post --vector {w}/cv --out {w}/out/cv"
EXTRACT = "chat-vector extract --base {w}/base --post {w}/post --out {w}/out/cv"

# (id, command line, expected fragment of the one error line[, setup(monkeypatch, w)][, output that may exist])
ROWS = [
    # chat-vector: non-finite scales, broken checkpoints (already held), an output under a file
    ("cv-scale-nan", APPLY + " --scale nan", "scale must be a finite number, got nan"),
    ("cv-scale-inf", APPLY + " --scale inf", "scale must be a finite number, got inf"),
    ("cv-scale-second-nan", APPLY + " --vector {w}/cv --scale 1 --scale=-inf", "scale 2 must be a finite number"),
    ("cv-workers-0", APPLY + " --workers 0", "workers must be an integer >= 1, got 0"),
    ("cv-truncated", "chat-vector extract --base {w}/base --post {w}/trunc --out {w}/out/cv",
     "{w}/trunc/model.safetensors is truncated"),
    ("cv-bad-config", "chat-vector extract --base {w}/base --post {w}/badcfg --out {w}/out/cv",
     "{w}/badcfg/config.json is not valid JSON"),
    ("cv-out-under-file", "chat-vector apply --target {w}/post --vector {w}/cv --out {w}/afile/cv",
     ("{w}/afile", "not a directory")),
    ("cv-disk-full", EXTRACT, "disk full at {w}/out/cv; free space and rerun the same command",
     lambda mp, w: mp.setattr("os.pwrite", _raise(OSError(errno.ENOSPC, "No space left on device")))),
    # synthesize: numbers, limits, prompts, models, positions
    ("syn-beta-nan", SYN + " --beta nan", "beta must be a finite number, got nan"),
    ("syn-beta-inf", SYN + " --beta inf", "beta must be a finite number, got inf"),
    ("syn-temperature-nan", SYN + " --temperature nan", "temperature must be a finite number, got nan"),
    ("syn-temperature-inf", SYN + " --temperature inf", "temperature must be a finite number, got inf"),
    ("syn-alpha-nan", SYN + " --alpha nan", "alpha must be a finite number"),
    ("syn-top-p-nan", SYN + " --top-p nan", "top_p must be a finite number"),
    ("syn-temperature-negative", SYN + " --temperature -1", "need temperature >= 0"),
    ("syn-limit-0", SYN + " --limit 0", "limit must be >= 1 (got 0)"),
    ("syn-limit-negative", SYN + " --limit -2", "limit must be >= 1 (got -2)"),
    ("syn-sample-0", SYN + " --sample 0", "sample must be >= 1"),
    ("syn-max-new-tokens-0", SYN + " --max-new-tokens 0", "max_new_tokens must be >= 1"),
    ("syn-batch-size-0", SYN + " --batch-size 0", "batch_size must be >= 1"),
    ("syn-repetition-threshold-nan", SYN + " --repetition-rule ngram --repetition-threshold nan",
     "repetition_threshold"),
    ("syn-chat-row-without-content",
     "synthesize --expert {w}/post --amateur {w}/base --prompts {w}/nocontent.jsonl --out {w}/out/syn",
     "turn 0 of 'messages' has no 'content'"),
    ("syn-empty-prompts", "synthesize --expert {w}/post --amateur {w}/base --prompts {w}/empty.jsonl --out {w}/out/syn",
     "{w}/empty.jsonl has no rows"),
    ("syn-1mb-prompt-by-chars", "synthesize --expert {w}/post --amateur {w}/base --prompts {w}/huge.jsonl "
     "--out {w}/out/syn", "raise max_prompt_chars"),
    ("syn-1mb-prompt-by-positions", "synthesize --expert {w}/post --amateur {w}/base --prompts {w}/huge.jsonl "
     "--out {w}/out/syn --max-prompt-chars 2000000 --max-new-tokens 4",
     "none of the 1 prompts fits the expert's 512 positions"),
    ("syn-long-prompts-error", "synthesize --expert {w}/post --amateur {w}/base --prompts {w}/long.jsonl "
     "--out {w}/out/syn --max-new-tokens 4 --long-prompts error", "prompt 'long' has"),
    ("syn-max-new-tokens-over-positions", SYN + " --max-new-tokens 600",
     "max_new_tokens 600 leaves no room for a prompt in the expert's 512 positions"),
    ("syn-truncated-expert", "synthesize --expert {w}/trunc --amateur {w}/base --prompts {w}/prompts.jsonl "
     "--out {w}/out/syn", "{w}/trunc/model.safetensors is truncated"),
    ("syn-truncated-amateur", "synthesize --expert {w}/post --amateur {w}/trunc --prompts {w}/prompts.jsonl "
     "--out {w}/out/syn", "{w}/trunc/model.safetensors is truncated"),
    ("syn-bad-config", "synthesize --expert {w}/badcfg --amateur {w}/base --prompts {w}/prompts.jsonl "
     "--out {w}/out/syn", "{w}/badcfg/config.json is not valid JSON"),
    ("syn-config-not-an-object", "synthesize --expert {w}/listcfg --amateur {w}/base --prompts {w}/prompts.jsonl "
     "--out {w}/out/syn", "{w}/listcfg/config.json is not a JSON object"),
    ("syn-damaged-tokenizer", "synthesize --expert {w}/badtok --amateur {w}/base --prompts {w}/prompts.jsonl "
     "--out {w}/out/syn", "cannot load expert from {w}/badtok"),
    ("syn-two-vocabularies", "synthesize --expert {w}/post --amateur {w}/other --prompts {w}/prompts.jsonl "
     "--out {w}/out/syn", "token -> id maps of"),
    ("syn-missing-model", "synthesize --expert {w}/nope --amateur {w}/base --prompts {w}/prompts.jsonl "
     "--out {w}/out/syn", "expert directory {w}/nope does not exist"),
    ("syn-template-kwargs-not-json", SYN + " --chat-template-kwargs {{enable_thinking:", "is not JSON"),
    ("syn-out-is-file", "synthesize --expert {w}/post --amateur {w}/base --prompts {w}/prompts.jsonl "
     "--out {w}/afile --max-new-tokens 2", "output {w}/afile is a file"),
    ("syn-disk-full", SYN + " --max-new-tokens 2", "disk full at {w}/out/syn; free space and rerun: it resumes",
     lambda mp, w: mp.setattr("distill.synthesize.records.ShardWriter.write",
                              _raise(OSError(errno.ENOSPC, "No space left on device"))), "{w}/out/syn"),
    ("syn-read-only", SYN + " --max-new-tokens 2", "is on a read-only file system", _replace_fails(errno.EROFS),
     "{w}/out/syn"),
    # evaluate: limits, models, rows, outputs, storage
    ("ev-batch-size-0", EV + " --batch-size 0", "batch_size must be an integer >= 1, got 0"),
    ("ev-max-new-tokens-0", EV + " --max-new-tokens 0", "max_new_tokens must be an integer >= 1, got 0"),
    ("ev-limit-0", EV + " --limit 0", "limit must be an integer >= 1, got 0"),
    ("ev-limit-negative", EV + " --limit -2", "limit must be an integer >= 1, got -2"),
    ("ev-max-length-0", EV + " --max-length 0", "max_length must be an integer >= 1"),
    ("ev-unknown-suite", EV + " --suite if,nope", "unknown suite(s) ['nope']"),
    ("ev-truncated", "evaluate --model {w}/trunc --prompts {w}/eval.jsonl --suite if --out {w}/out/ev.json",
     "{w}/trunc/model.safetensors is truncated"),
    ("ev-bad-config", "evaluate --model {w}/badcfg --prompts {w}/eval.jsonl --suite if --out {w}/out/ev.json",
     "{w}/badcfg/config.json is not valid JSON"),
    ("ev-damaged-tokenizer", "evaluate --model {w}/badtok --prompts {w}/eval.jsonl --suite if --out {w}/out/ev.json",
     "cannot load tokenizer from {w}/badtok"),
    ("ev-missing-model", "evaluate --model {w}/nope --prompts {w}/eval.jsonl --out {w}/out/ev.json",
     "model directory {w}/nope does not exist"),
    ("ev-empty-prompts", "evaluate --model {w}/post --prompts {w}/empty.jsonl --suite if --out {w}/out/ev.json",
     "{w}/empty.jsonl has no rows"),
    ("ev-prompts-directory", "evaluate --model {w}/post --prompts {w}/emptyds --suite if --out {w}/out/ev.json",
     "{w}/emptyds is a directory"),
    ("ev-instruction-null", "evaluate --model {w}/post --prompts {w}/eval_null.jsonl --suite if "
     "--out {w}/out/ev.json", "instruction is None, not a string"),
    ("ev-out-under-file", "evaluate --model {w}/post --prompts {w}/eval.jsonl --suite if --out {w}/afile/ev.json",
     "{w}/afile is a file, not a directory"),
    ("ev-disk-full", EV, "disk full at {w}/out/ev.json; free space and rerun", _replace_fails(errno.ENOSPC)),
    ("ev-permission", EV, "permission denied at {w}/out/ev.json", _replace_fails(errno.EACCES)),
    # train: numbers, data, models, outputs, storage
    ("tr-lr-nan", TR + " --lr nan", "lr must be a finite number, got nan"),
    ("tr-epochs-nan", TR + " --epochs nan --max-steps -1", "epochs must be a finite number, got nan"),
    ("tr-weight-decay-inf", TR + " --weight-decay inf", "weight_decay must be a finite number"),
    ("tr-batch-size-0", TR + " --batch-size 0", "batch_size must be >= 1"),
    ("tr-chat-row-without-content", "train --model {w}/post --data {w}/train_nocontent.jsonl --out {w}/out/tr "
     "--deepspeed none", "turn 1 of 'messages' has no 'role' and 'content'"),
    ("tr-empty-jsonl", "train --model {w}/post --data {w}/empty.jsonl --out {w}/out/tr --deepspeed none", "is empty"),
    ("tr-empty-dataset-dir", "train --model {w}/post --data {w}/emptyds --out {w}/out/tr --deepspeed none",
     "{w}/emptyds has no rows"),
    ("tr-empty-saved-dataset", "train --model {w}/post --data {w}/emptysaved --out {w}/out/tr --deepspeed none",
     "{w}/emptysaved is a saved dataset with no rows"),
    ("tr-out-under-file", "train --model {w}/post --data {w}/train.jsonl --out {w}/afile/tr --deepspeed none",
     "{w}/afile is a file, not a directory"),
    ("tr-truncated", "train --model {w}/trunc --data {w}/train.jsonl --out {w}/out/tr --deepspeed none",
     "{w}/trunc/model.safetensors is truncated"),
    ("tr-bad-config", "train --model {w}/badcfg --data {w}/train.jsonl --out {w}/out/tr --deepspeed none",
     "{w}/badcfg/config.json is not valid JSON"),
    ("tr-damaged-tokenizer", "train --model {w}/badtok --data {w}/train.jsonl --out {w}/out/tr --deepspeed none",
     "cannot load target model from {w}/badtok"),
    ("tr-missing-data", "train --model {w}/post --data {w}/nope.jsonl --out {w}/out/tr --deepspeed none",
     "training data {w}/nope.jsonl does not exist"),
    ("tr-disk-full-torch-save", TR + " --save-steps 1 --eval-fraction 0",
     "disk full at {w}/out/tr; free space and rerun: it resumes",
     lambda mp, w: mp.setattr("torch.save", _raise(RuntimeError(
         "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0\nbasic_ios::clear: iostream error"))),
     "{w}/out/tr.checkpoints"),
    # recipes: unknown keys (already held), undefined references, run_dir confinement, values
    ("recipe-unknown-key", "run {recipe}", "unknown key synthesis.betta", "synthesis: {{betta: 1}}\n"),
    ("recipe-undefined-variable", "run {recipe}",
     "source.base = ${{" + UNDEF + "}}: ${{" + UNDEF + "}} is undefined: the environment variable " + UNDEF
     + " is not set; set it, or pass --set source.base=VALUE",
     "source: {{base: '${{" + UNDEF + "}}', post: {w}/post}}\n"),
    ("recipe-undefined-variable-in-a-list", "run {recipe}", "train.seeds",  # not a string: a type error
     "train: {{seeds: ['${{" + UNDEF + "}}']}}\n"),
    ("recipe-undefined-zoo", "run {recipe}", "${{zoo}} is undefined: the recipe has no `world:` section",
     "run_dir: {w}/out/run\nevaluate: {{zoo: '${{zoo}}'}}\n"),
    ("recipe-name-escapes", "run {recipe}", "leaves runs/", "name: ../../x\n"),
    ("recipe-run-dir-escapes", "run {recipe}", "run_dir '../x' (from '../x') leaves runs/", "run_dir: ../x\n"),
    ("recipe-absolute-run-dir-name-escapes", "run {recipe}", "leaves {w}/out/", "name: ../../x\n"
     "run_dir: {w}/out/${{name}}\n"),
    ("recipe-beta-nan", "run {recipe}", "synthesis: beta must be a finite number", "synthesis: {{beta: .nan}}\n"),
    ("recipe-scale-inf", "run {recipe}", "weight_arithmetic.scale must be a finite number",
     "weight_arithmetic: {{scale: .inf}}\n"),
    ("recipe-evaluate-batch-0", "run {recipe}", "evaluate: batch_size must be an integer >= 1",
     "evaluate: {{batch_size: 0}}\n"),
    ("recipe-train-lr-nan", "run {recipe}", "train: lr must be a finite number", "train: {{lr: .nan}}\n"),
]


def _rows():
    for row in ROWS:
        rid, cmd, expect, *rest = row
        setup = rest[0] if rest else None
        may_exist = rest[1] if len(rest) > 1 else None
        yield pytest.param(cmd, expect, setup, may_exist, id=rid)


@pytest.mark.parametrize("cmd, expect, setup, may_exist", list(_rows()))
def test_bad_input_is_one_line_naming_the_file_or_flag_and_nothing_is_written(
        w, tmp_path, monkeypatch, capsys, cmd, expect, setup, may_exist):
    shutil.rmtree(w / "out", ignore_errors=True)
    (w / "out").mkdir()
    monkeypatch.chdir(tmp_path)  # relative run directories (runs/...) land here
    monkeypatch.delenv(UNDEF, raising=False)
    recipe = None
    if cmd.startswith("run "):  # a recipe row: `setup` is the YAML that makes a good recipe bad
        recipe, setup = _recipe(w, "r", setup), None
    argv = cmd.format(w=w, recipe=recipe).split()
    if setup is not None:
        setup(monkeypatch, w)
    rc = main(argv)
    monkeypatch.undo()  # os.replace & co. back before any assertion or cleanup
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"distill {argv[0]}: error: "), err  # the error is the last line...
    assert sum(line.startswith("distill ") and ": error: " in line for line in lines) == 1, err  # ...and the only one
    for fragment in (expect,) if isinstance(expect, str) else expect:
        assert fragment.format(w=w) in lines[-1], lines[-1]
    # Nothing written: no output, no run directory, no temporary file beside them (the one-writer
    # lock files of distill.io.locking aside: bookkeeping, not output).
    leftovers = [p for p in (w / "out").rglob("*") if ".lock" not in p.name
                 and (may_exist is None or not str(p).startswith(may_exist.format(w=w)))]
    assert leftovers == [], leftovers
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "x").exists()
    assert not (w / "afile").is_dir()


def test_an_environment_value_is_not_saved_in_the_run_directory(w, tmp_path, monkeypatch):
    """recipe.json and the report hold `${VAR}` as written, not the environment's value; a value the
    user wrote literally is saved as written."""
    secret = tmp_path / "private-home" / "prompts.jsonl"
    secret.parent.mkdir()
    shutil.copy(w / "prompts.jsonl", secret)
    monkeypatch.setenv("DISTILL_TEST_PROMPTS", str(secret))
    recipe = _recipe(w, "env", "prompts: {{synthesis: '${{DISTILL_TEST_PROMPTS}}'}}\nrun_dir: " + str(tmp_path / "run"))
    assert main(["run", recipe, "--only", "report"]) == 0
    saved = (tmp_path / "run" / "recipe.json").read_text()
    report = (tmp_path / "run" / "report.md").read_text()
    for text in (saved, report):
        assert "${DISTILL_TEST_PROMPTS}" in text and "private-home" not in text
        assert str(w / "post") in text  # written literally: saved as written
    from distill.recipe.schema import load_recipe, resolve_references

    assert resolve_references(load_recipe(recipe), None).prompts.synthesis == str(secret)  # the stages get the value


def test_prompts_over_the_positions_are_dropped_and_counted_in_the_card(w, tmp_path):
    out = tmp_path / "syn"
    assert main(["synthesize", "--expert", str(w / "post"), "--amateur", str(w / "base"), "--prompts",
                 str(w / "long.jsonl"), "--out", str(out), "--max-new-tokens", "4", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["short"]
    card = (out / "README.md").read_text()
    assert "1 prompts were dropped because their rendered tokens plus max_new_tokens (4) exceed the models' 512" in card
    stats = json.loads((out / "provenance.json").read_text())["prompt_set"]
    assert stats["dropped_over_positions"] == 1 and stats["kept"] == 1
