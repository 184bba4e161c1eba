"""`distill chat-vector extract | apply | stats`."""

from __future__ import annotations

from distill import DistillError
from distill.config import HelpFormatter, add_arguments, from_args
from distill.chat_vector.core import ApplyConfig, ExtractConfig, run_apply, run_extract


# -- command line ---------------------------------------------------------------------------

def _cmd_extract(args) -> int:
    run_extract(from_args(ExtractConfig, args))
    print(args.out)
    return 0


def _cmd_apply(args) -> int:
    scales = args.scale or []
    if scales and len(scales) != len(args.vector):
        raise DistillError(f"{len(args.vector)} --vector but {len(scales)} --scale: give one --scale per "
                           f"--vector (in the same order), or none for λ=1 everywhere")
    vectors = list(zip(args.vector, scales or [1.0] * len(args.vector)))
    run_apply(from_args(ApplyConfig, args, vectors=vectors))
    print(args.out)
    return 0


def add_cli(subparsers, summary: str | None = None) -> None:
    from distill.chat_vector.stats import add_stats_cli

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
