"""``pcr-fast``: the command line.

    pcr-fast train --model DIR --data FILE --out DIR [options]   fine-tune with (or without) PCR
    pcr-fast scan --model DIR --data FILE --out DIR [options]    audit a dataset: report.json/.csv/.html
    pcr-fast demo [options]   plain SFT vs PCR on poisoned data: table, results.json, PNG chart
    pcr-fast bench [names]    run the benchmark scripts in benchmarks/ (if present)
    pcr-fast --version
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .bench import add_bench_parser
from .demo import add_demo_parser
from .scan import add_scan_parser
from .train import add_train_parser


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="pcr-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pcr-fast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_scan_parser(sub)
    add_demo_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
