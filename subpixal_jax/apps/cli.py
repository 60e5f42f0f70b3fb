"""The ``subpixal-jax`` command line.

Commands: ``align`` (align FITS files and write their corrected WCS),
``apply`` (apply a stored solution), ``plot`` (redraw figures from a saved
summary) and ``demo`` (simulate dithered exposures with known WCS errors,
align them and compare). Exit codes: 0 success, 1 the alignment did not
succeed for every image, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

#: Exit codes.
EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def _chip_shape(text: str) -> tuple[int, int]:
    """Parse ``ROWSxCOLS`` (e.g. ``512x1024``)."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        msg = f"expected ROWSxCOLS, e.g. 512x1024, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return rows, cols


def _add_align_options(parser: argparse.ArgumentParser) -> None:
    from subpixal_jax.options import add_arguments

    add_arguments(parser)
    parser.add_argument(
        "--dq-bits", default="0", help="DQ bits to ignore, e.g. '4,8' (default 0)"
    )
    parser.add_argument("--progress", action="store_true", help="show progress")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write corrected copies into DIR (created if its parent exists; "
        "the inputs stay untouched)",
    )
    target.add_argument(
        "--in-place",
        action="store_true",
        help="update the input files (old WCS archived, atomic rewrite)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="report what would change, write nothing"
    )
    parser.add_argument(
        "--wcsname", default="SUBPIXAL", help="name of the new WCS (SUBPIXAL)"
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``subpixal-jax`` command."""
    parser = argparse.ArgumentParser(
        prog="subpixal-jax",
        description="Sub-pixel alignment of dithered exposures and WCS correction.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress messages, only results"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    align = sub.add_parser(
        "align",
        help="align FITS exposures and correct their WCS",
        description=(
            "Drizzle the exposures onto a common grid, detect sources, measure "
            "every source's sub-pixel displacement by cross-correlation against "
            "the others, fit a linear correction per exposure and iterate. "
            "Nothing is written unless --in-place or --output-dir is given."
        ),
    )
    align.add_argument("files", nargs="+", help="FITS files (SCI/ERR/DQ)")
    _add_align_options(align)
    _add_output_options(align)
    align.add_argument(
        "--pixel-scale",
        type=float,
        metavar="ARCSEC",
        help="pixel scale of the drizzle grid (default: the first image's)",
    )
    align.add_argument(
        "--rotation",
        type=float,
        metavar="DEG",
        help="orientation of the drizzle grid, degrees East of North (default 0)",
    )
    align.add_argument(
        "--reference-catalog",
        metavar="FILE",
        help="after aligning, tie the set to this catalog (ECSV/CSV/FITS, RA/Dec "
        "in degrees; Gaia DR3 column names accepted; proper motions propagated "
        "to the exposures' epoch)",
    )
    align.add_argument(
        "--force",
        action="store_true",
        help="write every aligned image even when the verdict refuses it "
        "(not converged, too few sources, inconsistent residuals)",
    )
    align.add_argument(
        "--apply-insignificant",
        action="store_true",
        help="also write corrections smaller than 3 sigma of their own error",
    )
    align.add_argument(
        "--summary", metavar="FILE.ecsv", help="write the summary and solution here"
    )
    align.add_argument("--plots", metavar="DIR", help="write diagnostic PNGs here")

    apply = sub.add_parser(
        "apply",
        help="apply a stored solution to files",
        description="Apply the corrections stored in a summary ECSV to files.",
    )
    apply.add_argument("summary", help="summary ECSV written by 'align --summary'")
    apply.add_argument(
        "files",
        nargs="+",
        help="files to correct (FITS, or JWST *_cal.fits with a gWCS: an "
        "exposure's detector files together)",
    )
    _add_output_options(apply)
    apply.add_argument(
        "--force",
        action="store_true",
        help="apply to files whose WCS is not the one the solution was fitted "
        "from, and to read-only files",
    )

    many = sub.add_parser(
        "align-many",
        help="align many visits on a Dask cluster",
        description=(
            "One task per visit on a Dask cluster (a local one by default); "
            "VISITS is a CSV/ECSV table with columns 'visit' and 'path'. "
            "Needs the 'distributed' extra."
        ),
    )
    many.add_argument("visits", help="CSV/ECSV table with columns visit, path")
    _add_align_options(many)
    target = many.add_mutually_exclusive_group()
    target.add_argument(
        "--output-dir", metavar="DIR", help="write corrected copies to DIR/<visit>/"
    )
    target.add_argument("--in-place", action="store_true", help="update the files")
    many.add_argument("--wcsname", default="SUBPIXAL", help="name of the new WCS")
    many.add_argument(
        "--summary", metavar="FILE.ecsv", help="summary; re-runs skip finished visits"
    )
    many.add_argument(
        "--scheduler", metavar="ADDRESS", help="connect to this scheduler"
    )
    many.add_argument(
        "--workers", type=int, default=2, help="local worker processes (default 2)"
    )

    plot = sub.add_parser(
        "plot",
        help="redraw figures from a saved summary",
        description="Redraw the convergence figure from a summary ECSV.",
    )
    plot.add_argument("summary", help="summary ECSV")
    plot.add_argument(
        "--output", required=True, metavar="FILE.png", help="PNG file to write"
    )

    demo = sub.add_parser(
        "demo",
        help="simulate dithered exposures with known WCS errors and align them",
        description=(
            "Simulate four dithered two-chip exposures (ACS/WFC-like) with known "
            "WCS errors, align them (exposure 0 held as the reference) and print "
            "injected vs recovered errors and the residual misregistration."
        ),
    )
    demo.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write the files here (default: a new temporary directory)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--fitgeom",
        default="general",
        choices=("shift", "rshift", "rscale", "general"),
        help="fit geometry (default general)",
    )
    demo.add_argument(
        "--refine",
        choices=("sources", "transform"),
        help="refine by least squares through the blot",
    )
    # Small settings for quick runs and tests; not part of the advertised interface.
    demo.add_argument("--chip-shape", type=_chip_shape, help=argparse.SUPPRESS)
    demo.add_argument("--n-exposures", type=int, help=argparse.SUPPRESS)
    demo.add_argument("--simulate-only", action="store_true", help=argparse.SUPPRESS)
    return parser


def _error(command: str, exc: Exception) -> int:
    print(f"subpixal-jax {command}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def _print_result(result, reports) -> None:
    """Print the run's status and every image's total correction and verdict."""
    print(f"status: {result.status} after {result.n_iterations} iteration(s)")
    print(
        f"  {'image':<24} {'status':<13} {'n_fit':>5} {'dx [px]':>16} "
        f"{'dy [px]':>16} {'dx,dy [mas]':>14} {'rot [arcsec]':>16} {'scale [ppm]':>11}"
    )
    for r in reports:
        px = r.image_scale if r.image_scale > 0 else 1.0
        print(
            f"  {Path(r.name).name:<24} {r.outcome.status.value:<13} {r.n_fit:>5d} "
            f"{r.dx * px:+8.4f}±{r.dx_err * px:6.4f} "
            f"{r.dy * px:+8.4f}±{r.dy_err * px:6.4f} "
            f"{r.dx * r.mas_per_px:+6.1f},{r.dy * r.mas_per_px:+6.1f} "
            f"{r.rot:+8.3f}±{r.rot_err:6.3f} {r.scale_ppm:+11.1f}"
        )
        for text in (r.outcome.reason, r.reason):
            if text:
                print(f"    {text}")
    _print_tie(result.absolute)


def _print_tie(tie) -> None:
    """Print the absolute tie's outcome (nothing when none was asked for)."""
    if tie is None:
        return
    if not tie.ok:
        print(f"absolute tie: not applied ({tie.reason})")
        return
    err = tie.shift_err_mas
    print(
        f"absolute tie to {tie.catalog or 'the reference catalog'}: "
        f"{tie.grade.value}, {tie.n_matches} stars, rms {tie.rms_mas:.1f} mas, "
        f"shift ({tie.shift[0] * tie.pixel_scale:+.1f}±{err[0]:.1f}, "
        f"{tie.shift[1] * tie.pixel_scale:+.1f}±{err[1]:.1f}) mas"
    )


def _all_ok(result) -> bool:
    from subpixal_jax.status import ImageStatus

    done = (ImageStatus.SUCCESS, ImageStatus.REFERENCE)
    return result.converged and all(o.status in done for o in result.final_status)


def _policy(args):
    from subpixal_jax.pipeline.verdict import WritePolicy

    return WritePolicy(force=args.force, apply_insignificant=args.apply_insignificant)


def _run_align(args: argparse.Namespace) -> int:
    # Inputs are checked before JAX is even imported: a mistake is reported
    # within a second, and the first progress line comes at once.
    from subpixal_jax.io.preflight import check_inputs

    log = logging.getLogger("subpixal_jax.apps.cli")
    log.info("checking %d input file(s)", len(args.files))
    dq_bits = int(args.dq_bits) if args.dq_bits.isdigit() else args.dq_bits
    try:
        checked = check_inputs(
            args.files,
            in_place=args.in_place and not args.dry_run,
            output_dir=args.output_dir,
            summary=args.summary,
            wcsname=args.wcsname,
            force=args.force,
            dq_bits=dq_bits,
        )
    except (ValueError, OSError) as exc:
        return _error("align", exc)
    log.info("inputs look fine; loading JAX")
    from subpixal_jax.align import align_files
    from subpixal_jax.options import from_arguments

    try:
        options = from_arguments(
            args,
            history="all" if args.plots else "last",
            keep_diagnostics=bool(args.plots),
        )
    except (ValueError, TypeError) as exc:
        return _error("align", exc)
    try:
        result, reports = align_files(
            args.files,
            in_place=args.in_place,
            output_dir=args.output_dir,
            dry_run=args.dry_run,
            wcsname=args.wcsname,
            summary=args.summary,
            dq_bits=dq_bits,
            options=options,
            progress=args.progress,
            pixel_scale=args.pixel_scale,
            rotation=args.rotation,
            policy=_policy(args),
            reference_catalog=args.reference_catalog,
            checked=checked,
        )
    except (ValueError, OSError) as exc:
        return _error("align", exc)
    from subpixal_jax.pipeline.verdict import image_reports

    verdicts = image_reports(result, _policy(args))
    _print_result(result, verdicts)
    for report in reports:
        print(report.text(max_changes=None if report.dry_run else 0))
    writing = args.in_place or args.output_dir or args.dry_run
    if not writing:
        print("no file written (use --in-place or --output-dir)")
    if args.plots:
        from subpixal_jax.apps.plots import write_figures

        for path in write_figures(result, args.plots):
            print(f"wrote {path}")
    held_back = [v for v in verdicts if v.correction is not None and not v.write]
    if writing and held_back:
        return EXIT_PARTIAL
    return EXIT_OK if _all_ok(result) else EXIT_PARTIAL


def _run_align_many(args: argparse.Namespace) -> int:
    try:
        from subpixal_jax.apps.distributed import align_visits
        from subpixal_jax.options import from_arguments

        table = align_visits(
            args.visits,
            client=args.scheduler,
            n_workers=args.workers,
            output_dir=args.output_dir,
            summary=args.summary,
            progress=args.progress,
            in_place=args.in_place,
            wcsname=args.wcsname,
            options=from_arguments(args),
        )
    except (ValueError, TypeError, OSError, ImportError) as exc:
        return _error("align-many", exc)
    table["visit", "image", "status", "dx", "dy", "error"].pprint_all()
    from subpixal_jax.status import ImageStatus

    done = {ImageStatus.SUCCESS, ImageStatus.REFERENCE, ImageStatus.SKIPPED}
    statuses = {ImageStatus(s) for s in table["status"]}
    return EXIT_OK if statuses <= done else EXIT_PARTIAL


def _run_apply(args: argparse.Namespace) -> int:
    from subpixal_jax.align import apply_solution

    try:
        reports = apply_solution(
            args.summary,
            args.files,
            wcsname=args.wcsname,
            output_dir=args.output_dir,
            dry_run=args.dry_run or not (args.in_place or args.output_dir),
            force=args.force,
        )
    except (ValueError, OSError) as exc:
        return _error("apply", exc)
    for report in reports:
        print(report.text())
    if not (args.in_place or args.output_dir):
        print("dry run: nothing written (use --in-place or --output-dir)")
    return EXIT_OK


def _run_plot(args: argparse.Namespace) -> int:
    from astropy.table import Table

    from subpixal_jax.apps.plots import plot_summary_table

    try:
        table = Table.read(args.summary, format="ascii.ecsv")
        figure = plot_summary_table(table)
        figure.savefig(args.output)
    except (ValueError, OSError, KeyError) as exc:
        return _error("plot", exc)
    print(f"wrote {args.output}")
    return EXIT_OK


def _run_demo(args: argparse.Namespace) -> int:
    """Simulate the demo data set, align it and compare with the truth.

    The files go to ``--output-dir`` when given; otherwise to a temporary
    folder that is removed afterwards.
    """
    if args.output_dir:
        return _demo_in(args.output_dir, args)
    with tempfile.TemporaryDirectory(prefix="subpixal-jax-demo-") as outdir:
        return _demo_in(outdir, args)


def _demo_in(outdir: str, args: argparse.Namespace) -> int:
    from subpixal_jax.simulate import (
        misregistration,
        recovered_error,
        simulate_exposures,
    )

    options = {"seed": args.seed}
    if args.chip_shape is not None:
        options["chip_shape"] = args.chip_shape
    if args.n_exposures is not None:
        options["n_exposures"] = args.n_exposures
    try:
        sim = simulate_exposures(outdir, **options)
    except ValueError as exc:
        return _error("demo", exc)
    rows, cols = sim.true_wcs[0][1].array_shape
    n_chips = len(sim.true_wcs[0])
    where = outdir if args.output_dir else f"{outdir} (removed afterwards)"
    print(f"Simulated {len(sim.paths)} exposures in {where}")
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
    if args.simulate_only:
        return EXIT_OK

    from subpixal_jax.align import align_files

    print()
    refine = f", refine={args.refine}" if args.refine else ""
    print(f"Aligning ({args.fitgeom}{refine}, exposure 0 held fixed)...")
    result, _ = align_files(
        sim.paths, fitgeom=args.fitgeom, reference=0, refine=args.refine
    )
    print(f"status: {result.status} after {result.n_iterations} iteration(s)")
    print()
    header = (
        f"{'file':<18} {'dx found':>9} {'dy found':>9} {'rot found':>10} "
        f"{'scale-1':>10} {'before [px]':>12} {'after [px]':>11}"
    )
    print("Recovered errors and residual misregistration (RMS over the chips):")
    print(header)
    print("-" * len(header))
    for i, path in enumerate(sim.paths):
        found = recovered_error(sim, i, result.final_wcs[i])
        before = misregistration(sim, i, sim.header_wcs[i])
        after = misregistration(sim, i, result.final_wcs[i])
        print(
            f"{path.name:<18} {found.shift[0]:>9.4f} {found.shift[1]:>9.4f} "
            f"{found.rotation:>10.5f} {found.scale - 1.0:>10.2e} "
            f"{before:>12.4f} {after:>11.4f}"
        )
    return EXIT_OK if _all_ok(result) else EXIT_PARTIAL


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Progress messages of this package on stderr from the first second.

    By default the package's own INFO messages (stages, iterations) are shown
    and other libraries' (Dask's) only from WARNING; ``-v`` shows everything
    at INFO, ``-vv`` at DEBUG; ``-q`` only warnings and errors.
    """
    root_level = logging.WARNING if verbose == 0 else logging.INFO
    if verbose >= 2:
        root_level = logging.DEBUG
    logging.basicConfig(level=root_level, format="%(levelname)s %(name)s: %(message)s")
    own = logging.WARNING if quiet else min(root_level, logging.INFO)
    logging.getLogger("subpixal_jax").setLevel(own)
    for noisy in ("distributed", "bokeh", "tornado"):
        logging.getLogger(noisy).setLevel(root_level if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    commands = {
        "align": _run_align,
        "align-many": _run_align_many,
        "apply": _run_apply,
        "plot": _run_plot,
        "demo": _run_demo,
    }
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        # A set of files is committed all together or rolled back
        # (io.transaction), so Ctrl-C needs no traceback, only the facts.
        print(
            f"subpixal-jax {args.command}: interrupted; files are changed all "
            "together or not at all",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
