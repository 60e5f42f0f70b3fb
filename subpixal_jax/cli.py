"""The ``subpixal-jax`` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile


def _chip_shape(text: str) -> tuple[int, int]:
    """Parse ``ROWSxCOLS`` (e.g. ``512x1024``)."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        msg = f"expected ROWSxCOLS, e.g. 512x1024, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return rows, cols


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``subpixal-jax`` command."""
    parser = argparse.ArgumentParser(
        prog="subpixal-jax",
        description="Sub-pixel alignment of dithered exposures and WCS correction.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="simulate a dithered data set with known WCS errors",
        description=(
            "Simulate four dithered two-chip exposures (ACS/WFC-like) with known "
            "WCS errors and list what was written."
        ),
    )
    demo.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write the files here (default: a new temporary directory)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    # Small settings for quick runs and tests; not part of the advertised interface.
    demo.add_argument("--chip-shape", type=_chip_shape, help=argparse.SUPPRESS)
    demo.add_argument("--n-exposures", type=int, help=argparse.SUPPRESS)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    """Simulate the demo data set and print the files and injected errors."""
    from subpixal_jax.simulate import simulate_exposures

    outdir = args.output_dir or tempfile.mkdtemp(prefix="subpixal-jax-demo-")
    options = {"seed": args.seed}
    if args.chip_shape is not None:
        options["chip_shape"] = args.chip_shape
    if args.n_exposures is not None:
        options["n_exposures"] = args.n_exposures
    try:
        sim = simulate_exposures(outdir, **options)
    except ValueError as exc:
        print(f"subpixal-jax demo: error: {exc}", file=sys.stderr)
        return 2
    rows, cols = sim.true_wcs[0][1].array_shape
    n_chips = len(sim.true_wcs[0])
    print(f"Simulated {len(sim.paths)} exposures in {outdir}")
    print(
        f"  {n_chips} chip(s) of {rows}x{cols} pixels at {sim.pixel_scale} arcsec/px, "
        f"EXPTIME {sim.exptime:g} s, units {sim.units}, sky {sim.sky:g} e-/px, "
        f"{len(sim.sources)} sources"
    )
    print(f"  truth: {sim.truth_path}")
    print()
    header = (
        f"{'file':<18} {'dx [px]':>9} {'dy [px]':>9} {'rot [deg]':>10} "
        f"{'scale-1':>10} {'skew [deg]':>10}"
    )
    print("Injected WCS errors (header = truth + error; exposure 0 is the reference):")
    print(header)
    print("-" * len(header))
    for path, err in zip(sim.paths, sim.errors, strict=True):
        print(
            f"{path.name:<18} {err.shift[0]:>9.4f} {err.shift[1]:>9.4f} "
            f"{err.rotation:>10.5f} {err.scale - 1.0:>10.2e} {err.skew:>10.5f}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _run_demo(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
