"""``python -m embkern {info,bench}`` (also the ``embkern`` console script): argument parsing only.

``info``  versions, CPU features, the compiled build, CUDA, and for every op
          which backends are active here and why the others are not
          (per kernel where an op's kernels differ). ``--json`` for machines.
          See :mod:`embkern._env`.
``bench`` see :mod:`embkern.bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="embkern", description="embkern: backend info and benchmarks.")
    sub = p.add_subparsers(dest="command")
    pi = sub.add_parser("info", help="versions, CPU, build, GPU, and which backends are active")
    pi.add_argument("--json", action="store_true", help="print JSON instead of text")
    from . import bench

    pb = sub.add_parser("bench", help="reference vs fast backends vs outside anchors; bench.json + chart")
    bench.add_arguments(pb)
    args = p.parse_args(argv)
    if args.command == "info":
        from . import _env

        info = _env.collect_info()
        print(json.dumps(info, indent=1, default=str) if args.json else _env.format_info(info))
        return 0
    if args.command == "bench":
        return bench.run(args)
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
