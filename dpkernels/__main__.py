"""Command line: ``dpkernels demo`` (or ``python -m dpkernels demo``) and ``dpkernels info``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from dpkernels import demo

    parser = argparse.ArgumentParser(
        prog="dpkernels", description="dpkernels: differentially private training (DP-SGD)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_demo = sub.add_parser(
        "demo", help="train an MLP on the bundled digits with DP-SGD and report accuracy, "
        "epsilon and the DP / non-private step time",
        description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p_demo)
    sub.add_parser("info", help="versions, GPU, C++ extension, and which backend runs "
                   "each op (same as python -m dpkernels.info)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from dpkernels import demo

        demo.check_arguments(parser, args)
        demo.run(args)
        return 0
    if args.command == "info":
        from dpkernels import info

        return info.main([])
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
