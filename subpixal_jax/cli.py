"""The ``subpixal-jax`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``subpixal-jax`` command."""
    parser = argparse.ArgumentParser(
        prog="subpixal-jax",
        description="Sub-pixel alignment of dithered exposures and WCS correction.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="simulate a dithered data set and align it")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from subpixal_jax.simulate import main_demo

        return main_demo()
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
