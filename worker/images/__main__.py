"""`python -m funnel_hpc.worker.images seed IMAGE --from-dir DIR --cache DIR` (see seed.py)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m funnel_hpc.worker.images")
    commands = parser.add_subparsers(dest="command", required=True)
    seed_cmd = commands.add_parser("seed", help="Put a local directory in the cache as IMAGE.")
    seed_cmd.add_argument("image", help="e.g. docker.io/library/busybox:latest")
    seed_cmd.add_argument("--from-dir", required=True, help="the image's root directory")
    seed_cmd.add_argument("--cache", required=True, help="the worker's image cache")
    args = parser.parse_args(argv)
    from . import ImageError
    from .seed import seed

    try:
        root = seed(args.image, args.from_dir, args.cache)
    except (ImageError, OSError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    print(f"{root.reference}@{root.digest} at {root.rootfs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
