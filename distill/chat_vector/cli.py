"""`distill chat-vector extract | apply | stats`."""

from __future__ import annotations

from pathlib import Path

from distill import DistillError
from distill.config import HelpFormatter, add_arguments, from_args
from distill.chat_vector.config import ApplyConfig, ExtractConfig


# -- command line ---------------------------------------------------------------------------

def _cmd_extract(args) -> int:
    from distill.chat_vector.core import run_extract

    run_extract(from_args(ExtractConfig, args))
    print(args.out)
    return 0


def _cmd_apply(args) -> int:
    scales = args.scale or []
    if scales and len(scales) != len(args.vector):
        raise DistillError(f"{len(args.vector)} --vector but {len(scales)} --scale: give one --scale per "
                           f"--vector (in the same order), or none for λ=1 everywhere")
    vectors = list(zip(args.vector, scales or [1.0] * len(args.vector)))
    from distill.chat_vector.core import run_apply

    run_apply(from_args(ApplyConfig, args, vectors=vectors))
    print(args.out)
    return 0


def add_cli(subparsers, summary: str | None = None) -> None:
    parser = subparsers.add_parser(
        "chat-vector", help=summary, formatter_class=HelpFormatter,
        description="Chat vectors in parameter space: Δ = θ_post − θ_base, added to a same-architecture "
                    "target as θ_target + λ·Δ. All commands stream one tensor at a time.")
    sub = parser.add_subparsers(dest="chat_vector_command", metavar="ACTION", required=True)
    ex = sub.add_parser("extract", formatter_class=HelpFormatter, help="Δ = post − base, written as a vector directory",
                        description="Write the chat vector Δ = θ_post − θ_base (computed in float32) as a "
                                    "safetensors directory with chat_vector.json.\n\nexample:\n  distill "
                                    "chat-vector extract --base mistral-7b --post mistral-7b-instruct --out cv")
    add_arguments(ex, ExtractConfig)
    ex.set_defaults(func=_cmd_extract)

    ap = sub.add_parser("apply", formatter_class=HelpFormatter, help="θ_target + Σ λ·Δ, written as a model directory",
                        description="Add one or more chat vectors, each with its own scale λ, to a target of "
                                    "the same architecture; the output has the target's config and tokenizer."
                                    "\n\nexample:\n  distill chat-vector apply --target mistral-7b-cp "
                                    "--vector cv --scale 1.0 --vector cv2 --scale -0.5 --out merged")
    add_arguments(ap, ApplyConfig)
    # ApplyConfig.vectors, as pairs of flags
    ap.add_argument("--vector", required=True, action="append", help="vector directory (repeatable)")
    ap.add_argument("--scale", type=float, action="append",
                    help="λ for the --vector at the same position (repeatable; negative and fractional "
                         "allowed; default 1.0 for all)")
    ap.set_defaults(func=_cmd_apply)
    add_stats_cli(sub)


def add_stats_cli(sub) -> None:
    p = sub.add_parser(
        "stats", formatter_class=HelpFormatter,
        help="norms of a chat vector per tensor / layer, cosine with another vector",
        description="Print ‖Δ‖ per layer (or per tensor), ‖Δ‖/‖θ_base‖ with --base, and cos(Δ, Δ') with "
                    "--compare, as a Markdown table; optionally also as JSON and CSV.\n\nexample:\n  "
                    "distill chat-vector stats cv --base mistral-7b --compare ft-delta --json cv.json")
    p.add_argument("vector", help="vector directory (from `distill chat-vector extract`)")
    p.add_argument("--base", help="base model the vector was extracted from: adds ‖Δ‖/‖θ_base‖")
    p.add_argument("--compare", metavar="VECTOR", help="a second vector directory: adds cos(Δ, Δ')")
    p.add_argument("--per-tensor", action="store_true", help="print every tensor, not one row per layer")
    p.add_argument("--json", type=Path, help="also write all numbers (per tensor, per layer, total) as JSON")
    p.add_argument("--csv", type=Path, help="also write the per-tensor numbers as CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_stats)


def _cmd_stats(args) -> int:
    from distill.chat_vector.stats import _cmd_stats as run

    return run(args)
