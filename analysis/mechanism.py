"""The mechanism claim measured in the data itself: does CoDIT remove pre-trained knowledge?

The paper's account of contrastive decoding is that subtracting the base model's log-probs keeps
what post-training added (following instructions) and removes what both models already knew
(facts). The embedded world knows every fact it made, so this can be counted in the synthesized
responses, before any student is trained. For each dataset (a `distill synthesize` output, or a
.jsonl of its rows) and each fact split (shared, source_only, conflict, target_only):

- over (response, fact) pairs, where the facts of a response are those of its prompt's land that
  the task asks for (the asked relation for a question, every relation for an open task), the share
  whose response states the source's value, and for conflict and target_only facts the target's;
- the share of responses that follow all their instruction's constraints (prompt-level, strict
  and loose, the IF suite's checkers).

"States" is `distill.evaluate.metrics.answer_matches` tried at every word start of the response:
the value occurs as a whole word (or words), case- and space-insensitive, so "Vel" does not match
"Velor". Flags, animals and exports come from small pools, so a response can name a value by
chance; target_only facts are the control (the source never saw those values).

A second table, facts of any land: responses also talk about other lands (the teacher's SFT lands,
which it memorised). A fact counts as stated with a value when some sentence (split at . ! ? line
breaks and ***/****** dividers) names its land as a whole word and states the value; shares over the
world's facts per split, for all lands and by group (own: synthesis prompts; SFT: sft.jsonl beside
them or --sft-prompts; other: the rest), and the share of sentences naming another land.

Several datasets per method (synthesis draws) give mean ± sample sd over draws. With recipe run
directories the student's own conflation numbers (scores/METHOD-seed*.json) sit beside them.

    python analysis/mechanism.py --run-dir runs/mask-0 --run-dir runs/mask-1 --out analysis/results/mechanism
    python analysis/mechanism.py --zoo ZOO --data codit=D1,D2 --data direct=D3,D4 --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from distill import DistillError
from distill.evaluate.metrics import answer_matches
from distill.recipe.compare import mean_std
from distill.io.files import atomic_write_json, atomic_write_text, iter_jsonl

SPLITS = ("shared", "source_only", "conflict", "target_only")
# (key, header): the data's numbers, then the student's (from scores files)
DATA_COLUMNS = [
    ("shared.source", "shared: source's value"),
    ("source_only.source", "source-only: source's value"),
    ("conflict.source", "conflict: source's value"),
    ("conflict.target", "conflict: target's value"),
    ("target_only.target", "target-only: target's value (chance)"),
    ("if_strict", "IF prompt strict"),
    ("if_loose", "IF prompt loose"),
]
STUDENT_COLUMNS = [
    ("student.conflict_source_way", "student: conflicts source's way", ("knowledge", "conflict", "source_way")),
    ("student.knowledge_own", "student: own-fact knowledge", ("knowledge", "own", "accuracy")),
]
GROUPS = {"all": "all", "own": "own", "sft": "SFT", "other": "other"}  # land groups of the second table
ANY_COLUMNS = [
    ("sentences_other", "sentences naming another land"),
    ("responses_other", "responses with one"),
] + [c for c in DATA_COLUMNS if "." in c[0]]
SENTENCE_END = re.compile(r"\*{3,}|[.!?\n]+")


def stats(xs) -> dict:
    """n, mean and sample sd (None below two values) of the numbers that are not None: the
    comparison's `mean_std`, with the key this module's tables use."""
    s = mean_std([None if x is None else float(x) for x in xs])
    return {"n": s["n"], "mean": s["mean"], "sd": s["std"]}


def fmt(s: dict, digits: int = 3) -> str:
    if s["mean"] is None:
        return "–"
    sd = f"{s['sd']:.{digits}f}" if s["sd"] is not None else "n/a"
    return f"{s['mean']:.{digits}f} ± {sd}"


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()  # answer_matches' own normalisation


def states(text: str, value: str | None) -> bool:
    """True when `value` occurs in `text` as a whole word: answer_matches at some word start."""
    if not value:
        return False
    t, v = _norm(text), _norm(value)
    i = t.find(v)
    while i >= 0:
        if (i == 0 or not t[i - 1].isalnum()) and answer_matches(t[i:], v):
            return True
        i = t.find(v, i + 1)
    return False


def sentences(text: str) -> list[str]:
    """The sentences of a response: split at . ! ? line breaks and *** / ****** dividers."""
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


# ----------------------------------------------------------------------------- inputs


def load_prompts(path: Path) -> dict[str, dict]:
    if not Path(path).is_file():
        raise DistillError(f"prompts file {path} not found; pass --prompts (the file the data was synthesized "
                           f"from, e.g. ZOO/prompts/synthesis.jsonl) or --zoo ZOO")
    return {row["id"]: row for _, row in iter_jsonl(path, "prompts") if isinstance(row, dict) and "id" in row}


def load_facts(path: Path) -> dict[str, dict[str, dict]]:
    """{land: {relation: question row}} from a world's knowledge/questions.jsonl."""
    if not Path(path).is_file():
        raise DistillError(f"knowledge file {path} not found; pass --questions ZOO/knowledge/questions.jsonl "
                           f"or --zoo ZOO")
    facts: dict[str, dict[str, dict]] = {}
    for n, row in iter_jsonl(path, "knowledge file"):
        if not {"entity", "relation", "split"} <= set(row):
            raise DistillError(f"knowledge file {path} line {n} has no entity/relation/split; pass the "
                               f"questions.jsonl of a world (distill zoo build)")
        facts.setdefault(row["entity"], {})[row["relation"]] = row
    return facts


def land_groups(prompts: dict[str, dict], facts: dict, sft: Path | None) -> dict[str, set | None]:
    """The world's lands by group: own (synthesis prompts), sft (the SFT prompts), other; None without sft."""
    lands = set(facts)
    own = {p.get("entity") for p in prompts.values()} & lands
    if sft is None:
        return {"all": lands, "own": own, "sft": None, "other": None}
    sft_lands = {row.get("entity") for _, row in iter_jsonl(sft, "SFT prompts") if isinstance(row, dict)} & lands
    sft_lands -= own  # a land of both prompt sets counts as own
    return {"all": lands, "own": own, "sft": sft_lands, "other": lands - own - sft_lands}


def dataset_rows(path: str | Path) -> tuple[list[dict], Path]:
    """The rows of a synthesized dataset: a `distill synthesize` output directory or a .jsonl file."""
    p = Path(path)
    if p.is_dir():
        if (p / "data" / "train.jsonl").is_file():
            p = p / "data" / "train.jsonl"
        elif (p / "shards").is_dir():
            raise DistillError(f"{p} is an unfinished synthesis (no data/train.jsonl); rerun its `distill synthesize` "
                               f"command to finish and merge it")
        else:
            raise DistillError(f"{p} is not a synthesis output (no data/train.jsonl); pass the --out of "
                               f"`distill synthesize` or a .jsonl of its rows")
    elif not p.is_file():
        raise DistillError(f"dataset {p} not found; pass a `distill synthesize` output directory or a .jsonl file")
    rows = [row for _, row in iter_jsonl(p, "synthesized data")]
    if not rows:
        raise DistillError(f"dataset {p} has no rows; synthesize it again")
    bad = next((i for i, r in enumerate(rows, 1) if "id" not in r or "response" not in r), None)
    if bad:
        raise DistillError(f"dataset {p} row {bad} has no id/response; pass rows written by `distill synthesize`")
    return rows, p


# ----------------------------------------------------------------------------- measuring


def measure(rows: list[dict], prompts: dict[str, dict], facts: dict, where: str = "dataset") -> dict:
    """One dataset's numbers: per split the (response, fact) pairs and the shares stating each value."""
    from distill.evaluate.checkers import check_loose, check_strict
    from distill.evaluate.metrics import instruction_following

    missing = [r["id"] for r in rows if r["id"] not in prompts]
    if missing:
        raise DistillError(f"{where}: {len(missing)} row id(s) are not in the prompts file (first: {missing[0]!r}); "
                           f"pass the prompts the data was synthesized from (--prompts or --zoo)")
    counts = {s: {"pairs": 0, "source": 0, "target": 0} for s in SPLITS}
    for r in rows:
        prompt = prompts[r["id"]]
        land = prompt.get("entity")
        if not land:
            continue  # not a world prompt: no facts to count
        if land not in facts:
            raise DistillError(f"{where}: prompt {r['id']} is about {land!r}, which the knowledge file does not know; "
                               f"pass the questions.jsonl of the same world as the prompts")
        relation = prompt.get("relation")
        asked = facts[land].values() if relation is None else [facts[land].get(relation)]
        for fact in asked:
            if fact is None:
                raise DistillError(f"{where}: prompt {r['id']} asks for {land}'s {relation}, which the knowledge "
                                   f"file lacks; pass the questions.jsonl of the same world as the prompts")
            c = counts.setdefault(fact["split"], {"pairs": 0, "source": 0, "target": 0})
            c["pairs"] += 1
            c["source"] += states(r["response"], fact.get("source_answer"))
            c["target"] += states(r["response"], fact.get("target_answer"))
    splits = {}
    for split, c in counts.items():
        share = (lambda k: c[k] / c["pairs"] if c["pairs"] else None)
        splits[split] = {"pairs": c["pairs"],
                         "source_way": share("source") if split != "target_only" else None,
                         "target_way": share("target") if split in ("conflict", "target_only") else None}
    scores = instruction_following([r["response"] for r in rows], [prompts[r["id"]] for r in rows],
                                   check_strict, check_loose)
    flat = {f"{s}.source": splits[s]["source_way"] for s in SPLITS}
    flat.update({f"{s}.target": splits[s]["target_way"] for s in SPLITS})
    flat.update(if_strict=scores["prompt_level_strict"], if_loose=scores["prompt_level_loose"])
    return {"rows": len(rows), "splits": splits, "if_prompts": scores["prompts"], "metrics": flat}


def measure_any_land(rows: list[dict], prompts: dict[str, dict], facts: dict, groups: dict) -> dict:
    """Facts of any land stated in some sentence naming their land; sentences naming another land."""
    names = {land: _norm(land) for land in facts}
    stated: set[tuple[str, str, str]] = set()  # (land, relation, "source" / "target")
    n_sentences, other_sentences, other_responses = 0, dict.fromkeys(groups, 0), dict.fromkeys(groups, 0)
    for r in rows:
        own, seen = prompts[r["id"]].get("entity"), set()
        for sentence in sentences(r["response"]):
            n_sentences += 1
            t = _norm(sentence)
            named = {land for land, name in names.items() if name in t and states(t, name)}
            for land in named:
                for relation, fact in facts[land].items():
                    stated.update((land, relation, who) for who in ("source", "target")
                                  if states(t, fact.get(f"{who}_answer")))
            others = named - {own}
            seen |= others
            for g, lands in groups.items():
                other_sentences[g] += bool(lands and others & lands)
        for g, lands in groups.items():
            other_responses[g] += bool(lands and seen & lands)
    result: dict = {"sentences": n_sentences}
    for g, lands in groups.items():
        if lands is None:
            result[g] = None
            continue
        splits = {}
        for split in SPLITS:
            pool = [(land, rel) for land in sorted(lands) for rel, f in facts[land].items() if f["split"] == split]
            splits[split] = {"facts": len(pool), **{who: sum((land, rel, who) in stated for land, rel in pool)
                                                    for who in ("source", "target")}}
        metrics = {"sentences_other": other_sentences[g] / n_sentences if n_sentences else None,
                   "responses_other": other_responses[g] / len(rows) if rows else None}
        for split, c in splits.items():
            has = {"source": split != "target_only", "target": split in ("conflict", "target_only")}
            metrics.update({f"{split}.{who}": c[who] / c["facts"] if has[who] and c["facts"] else None
                            for who in ("source", "target")})
        result[g] = {"lands": len(lands), "sentences_other": other_sentences[g],
                     "responses_other": other_responses[g], "splits": splits, "metrics": metrics}
    return result


def mechanism(datasets: dict[str, list], prompts: Path, questions: Path, out: Path | None = None,
              student: dict[str, list[dict]] | None = None, title: str = "The mechanism in the data",
              sft_prompts: Path | None = None) -> dict:
    """Measure every dataset of every method (its list: synthesis draws); write mechanism.md/.json
    into `out` when given. `student`: {method: [scores dicts]} of students trained on that data.
    `sft_prompts`: the teacher's SFT prompts (default: sft.jsonl beside `prompts`, when there)."""
    if not datasets:
        raise DistillError("nothing to measure: give --data METHOD=DIR or --run-dir RUN")
    if sft_prompts is None and (Path(prompts).parent / "sft.jsonl").is_file():
        sft_prompts = Path(prompts).parent / "sft.jsonl"
    elif sft_prompts is not None and not Path(sft_prompts).is_file():
        raise DistillError(f"SFT prompts file {sft_prompts} not found; pass --sft-prompts ZOO/prompts/sft.jsonl")
    by_id, facts = load_prompts(prompts), load_facts(questions)
    groups = land_groups(by_id, facts, sft_prompts)
    result = {"prompts": str(prompts), "questions": str(questions), "methods": {},
              "sft_prompts": str(sft_prompts) if sft_prompts else None}
    for method, paths in datasets.items():
        draws = []
        for path in paths:
            rows, file = dataset_rows(path)
            draws.append({"path": str(file), **measure(rows, by_id, facts, str(file)),
                          "any_land": measure_any_land(rows, by_id, facts, groups)})
        summary = {k: stats([d["metrics"][k] for d in draws]) for k, _ in DATA_COLUMNS}
        for key, _, keys in STUDENT_COLUMNS:
            summary[key] = stats([lookup(s, keys) for s in (student or {}).get(method, [])])
        any_land = {g: None if groups[g] is None else
                    {k: stats([d["any_land"][g]["metrics"][k] for d in draws]) for k, _ in ANY_COLUMNS}
                    for g in GROUPS}
        result["methods"][method] = {"draws": draws, "summary": summary, "any_land": any_land,
                                     "rows": stats([d["rows"] for d in draws])}
    result["markdown"] = markdown(result, title)
    if out is not None:
        atomic_write_text(Path(out) / "mechanism.md", result["markdown"])
        atomic_write_json(Path(out) / "mechanism.json", {k: v for k, v in result.items() if k != "markdown"})
    return result


def lookup(d: dict, keys: tuple):
    """The number at d[k0][k1]...; None when absent."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def markdown(result: dict, title: str) -> str:
    methods = result["methods"]
    columns = DATA_COLUMNS + [(k, h) for k, h, _ in STUDENT_COLUMNS
                              if any(m["summary"][k]["n"] for m in methods.values())]
    lines = [f"# {title}", "",
             "Shares over (response, fact) pairs; a response's facts are its prompt's land's facts that the task "
             "asks for (one relation for a question, all for an open task). A value is stated when it occurs as a "
             "whole word (answer_matches at any word start). Mean ± sample sd over synthesis draws (n/a: one draw).",
             "", "| data | draws | rows | " + " | ".join(h for _, h in columns) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for method, m in methods.items():
        lines.append(f"| {method} | {len(m['draws'])} | {m['rows']['mean']:.0f} | "
                     + " | ".join(fmt(m["summary"][k]) for k, _ in columns) + " |")
    lines += ["", "Pairs per split (each draw): " + "; ".join(
        f"{method}: " + ", ".join(f"{s} {'/'.join(str(d['splits'][s]['pairs']) for d in m['draws'])}" for s in SPLITS)
        for method, m in methods.items()) + "."]
    if any(m["summary"]["student.conflict_source_way"]["n"] for m in methods.values()):
        lines.append("Student columns: the target fine-tuned on that data, mean ± sd over its runs (seeds x draws).")
    return "\n".join(lines + any_land_markdown(result)) + "\n"


def any_land_markdown(result: dict) -> list[str]:
    methods = result["methods"]
    lines = ["", "**Facts of any land.** Each response is split into sentences (at . ! ? line breaks and *** / "
             "****** dividers); a sentence names a land when the land's name occurs in it as a whole word "
             "(case-insensitive). A fact of the world (any land of questions.jsonl) is stated with a value when some "
             "sentence of the dataset names its land and states the value (the rule above): a value without its "
             "land's name counts for no fact, a sentence naming two lands for both. Shares are over the world's facts "
             "of each split, for all lands and by group: own = the synthesis prompts' lands, SFT = the lands of the "
             "teacher's SFT prompts (" + (f"`{result['sft_prompts']}`" if result["sft_prompts"] else
                                          "n/a: no sft.jsonl beside the prompts; pass --sft-prompts") +
             "), other = the rest (eval lands). 'Sentences naming another land': the share of all sentences naming a "
             "land of the row's group other than the response's own prompt land; 'responses with one': the share of "
             "responses with such a sentence. Mean ± sample sd over draws; k/n: facts stated / facts, each draw.",
             "", "| data | lands | " + " | ".join(h for _, h in ANY_COLUMNS)
             + " | conflict facts stated the source's way (k/n per draw) |",
             "| --- | --- | " + " | ".join("---:" for _ in ANY_COLUMNS) + " | ---: |"]
    for method, m in methods.items():
        for g, label in GROUPS.items():
            if m["any_land"][g] is None:
                lines.append(f"| {method} | {label} | " + " | ".join("n/a" for _ in range(len(ANY_COLUMNS) + 1)) + " |")
                continue
            counts = ", ".join(f"{c['source']}/{c['facts']}" for c in
                               (d["any_land"][g]["splits"]["conflict"] for d in m["draws"]))
            lines.append(f"| {method} | {label} ({m['draws'][0]['any_land'][g]['lands']}) | "
                         + " | ".join(fmt(m["any_land"][g][k]) for k, _ in ANY_COLUMNS) + f" | {counts} |")
    return lines


# ----------------------------------------------------------------------------- command line


def _from_run_dirs(run_dirs: list[Path]) -> tuple[dict, dict, dict]:
    """Datasets, student scores and the recipe's prompts/zoo of recipe run directories."""
    datasets: dict[str, list] = {}
    student: dict[str, list] = {}
    recipe = {}
    for run in run_dirs:
        if not (run / "recipe.json").is_file():
            raise DistillError(f"{run / 'recipe.json'} not found; --run-dir must be a `distill run` run directory")
        recipe = recipe or json.loads((run / "recipe.json").read_text())
        for data in sorted(p for p in (run / "data").glob("*") if p.is_dir()):
            datasets.setdefault(data.name, []).append(data)
            for f in sorted((run / "scores").glob(f"{data.name}-seed*.json")):
                student.setdefault(data.name, []).append(json.loads(f.read_text()))
    return datasets, student, recipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", default=[], metavar="METHOD=PATH[,PATH...]",
                   help="a method's datasets (synthesize output dirs or .jsonl files), one per synthesis draw; "
                        "repeatable")
    p.add_argument("--run-dir", action="append", default=[], metavar="RUN",
                   help="a `distill run` directory: every RUN/data/METHOD/ is a draw of METHOD, and RUN/scores/"
                        "METHOD-seed*.json the student's scores; repeatable (e.g. one per synthesis seed)")
    p.add_argument("--zoo", help="world directory: --prompts ZOO/prompts/synthesis.jsonl, --questions "
                                 "ZOO/knowledge/questions.jsonl (default with --run-dir: the run's recipe)")
    p.add_argument("--prompts", help="the prompts the data was synthesized from (id, constraints, entity, relation)")
    p.add_argument("--questions", help="the world's knowledge/questions.jsonl (entity, relation, split, answers)")
    p.add_argument("--sft-prompts", help="the teacher's SFT prompts, whose lands are the 'SFT' group of the "
                                        "facts-of-any-land table (default: sft.jsonl beside the prompts file)")
    p.add_argument("--out", required=True, help="output directory for mechanism.md and mechanism.json")
    args = p.parse_args(argv)
    try:
        datasets, student, recipe = _from_run_dirs([Path(d) for d in args.run_dir])
        for item in args.data:
            method, sep, paths = item.partition("=")
            if not sep or not paths:
                raise DistillError(f"--data {item!r}: expected METHOD=PATH[,PATH...], "
                                   f"e.g. --data codit=runs/a/data/codit")
            datasets.setdefault(method, []).extend(Path(x) for x in paths.split(","))
        zoo = args.zoo or os.path.expandvars((recipe.get("evaluate") or {}).get("zoo") or "") or None
        prompts = args.prompts or (zoo and str(Path(zoo) / "prompts" / "synthesis.jsonl"))
        if not args.prompts and recipe.get("prompts", {}).get("synthesis") and not args.zoo:
            prompts = os.path.expandvars(recipe["prompts"]["synthesis"])
        questions = args.questions or (zoo and str(Path(zoo) / "knowledge" / "questions.jsonl"))
        if not prompts or not questions:
            raise DistillError("the world's files are not known: pass --zoo ZOO, or --prompts and --questions")
        sft = Path(args.sft_prompts) if args.sft_prompts else None
        result = mechanism(datasets, Path(prompts), Path(questions), Path(args.out), student, sft_prompts=sft)
    except DistillError as exc:
        print(f"mechanism: error: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
