"""`ninlab cache path|clear`: where the kernel probe keeps what it measured, and removing it."""

from __future__ import annotations

import argparse

from ninlab.analysis.kernel_cache import cache_directory, clear_cache


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="show or clear the kernel probe's measurements kept on disk",
        description="Kernels no rule knows (bf16 convolutions, some oneDNN float32 ones) are run "
        "once per machine and their blocks kept on disk, keyed by the CPU, its instruction set, "
        "the thread count and torch's build. Set NINLAB_CACHE_DIR to move the folder, "
        "NINLAB_NO_CACHE=1 to neither read nor write it.",
    )
    parser.add_argument("action", choices=("path", "clear"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    directory = cache_directory()
    if directory is None:
        print("the cache is off (NINLAB_NO_CACHE)")
    elif args.action == "path":
        print(directory)
    elif clear_cache() is None:
        print(f"nothing to remove at {directory}")
    else:
        print(f"removed {directory}")
    return 0
