"""`distill zoo build`: build (or reuse from the cache) the embedded world and its models."""

from __future__ import annotations

import json


def add_cli(subparsers, summary: str | None = None) -> None:
    zoo = subparsers.add_parser(
        "zoo", help=summary,
        description="The embedded default: a synthetic world (made-up facts, verifiable instructions) and "
                    "four small models (source-base/-post/-cp in Mistral architecture, target-base in Qwen2).",
    )
    sub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    build = sub.add_parser(
        "build", help="build the zoo (cached) and print its directory",
        description="Build the world, its tokenizers and its four models, measure their quality, and print "
                    "the quality table and then the zoo directory (as the last line). A zoo built from the "
                    "same preset and code is reused instantly.",
    )
    build.add_argument("--preset", default="tiny", choices=["micro", "tiny", "small"],
                       help="size: micro (seconds, for tests), tiny (minutes on 2 CPU cores, the demo), "
                            "small (larger, meant for a GPU; uses CUDA when available) (default: tiny)")
    build.add_argument("--out", default=None,
                       help="write the zoo to this directory instead of the cache "
                            "($DISTILL_CACHE/zoo/<preset>-<hash>, DISTILL_CACHE defaults to ~/.cache/distill)")
    build.add_argument("--overwrite", "--force", dest="force", action="store_true",
                       help="rebuild even if a complete zoo is already there")
    build.set_defaults(func=_build)
    zoo.set_defaults(func=lambda args: zoo.print_help())


def _build(args) -> int:
    from distill.world.zoo import build_zoo, format_table

    path = build_zoo(args.preset, out=args.out, force=args.force)
    print(format_table(json.loads((path / "quality.json").read_text())))
    print(path)
    return 0
