"""Per-source accuracy against the Cramér–Rao bound, and the cost of refinement.

Standard cutouts of docs/accuracy.md (25x25, gaussian / moffat / sersic, peak S/N
20, 100, 1000). Methods: the interlaced cross-correlation (core/xcorr) with
its default peak fit (``peak_fit='template'``) given the pixel variances as
the pipeline gives them, the same without variances (an unweighted fit),
with ``peak_fit='lagrange'`` (the former default: the correlation peak),
with ``peak_fit='quadratic'`` and with ``exact_original=True`` (the original
method), refine_displacements started from the default's answer, skimage's
phase_cross_correlation (upsample 100, normalization=None) and, when
importable, image_registration's chi2_shift. Prints the per-axis RMS error
over RMS/CRB, the pull std (error / reported sigma) of the default,
unweighted and original paths and of refinement, a zero-shift table
(image = reference on pedestals and on a 512x512 texture), the
refinement's compile time and median cost per source, and the end-to-end
rows: the default simulated set
(``subpixal-jax demo``, four two-chip 512x1024 exposures) aligned with
default options for three seeds, residual misregistration and rotation
error of every image against the truth (exposure 0 held fixed).

Usage: python benchmarks/bench_accuracy.py [--quick] [--no-end-to-end]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from skimage.registration import phase_cross_correlation

from subpixal_jax.align import align_files
from subpixal_jax.core.measure import REFINE_DTYPE, REFINE_ITERATIONS
from subpixal_jax.core.refine import refine_displacements
from subpixal_jax.core.xcorr import find_displacements
from subpixal_jax.simulate import misregistration, recovered_error, simulate_exposures
from subpixal_jax.testing.accuracy import (
    KINDS,
    cramer_rao_bound,
    make_case,
    model_image,
    refinement_inputs,
    texture_references,
)

try:
    from image_registration import chi2_shift
except ImportError:
    chi2_shift = None

SIZE = 25
SNRS = (20, 100, 1000)


def _rms(err):
    return float(np.sqrt(np.mean(err**2)))


def _pull(err, sigma):
    return float(np.std(err / sigma))


def zero_shift_rows() -> list[tuple]:
    """``(case, cc_type, max |d|: default, per-lag, original)``, image = reference."""
    rows = []
    shifts = ((0, 0), (1, 0), (0, 1), (1, 1))
    params = {"kind": "gaussian", "sigma": 1.5, "x0": 12.0, "y0": 12.0}
    base = np.stack([model_image(params, 25, (a / 2, b / 2)) for a, b in shifts])
    for pedestal in (0.0, 0.1, 1.0):
        refs = (base + pedestal * base[0].max()).astype(np.float32)[None]
        for cc_type in ("CC", "NCC", "ZNCC"):
            rows.append(
                (
                    f"gaussian sigma 1.5, 25x25, pedestal {pedestal:.0%}",
                    cc_type,
                    *_zero_shift(refs, cc_type),
                )
            )
    refs = texture_references(512, seed=3).astype(np.float32)[None]
    for cc_type in ("NCC", "ZNCC"):
        rows.append(("texture 512x512", cc_type, *_zero_shift(refs, cc_type)))
    return rows


def _zero_shift(refs, cc_type):
    runs = [{}, {"overlap_normalise": True}, {"exact_original": True}]
    return tuple(
        float(
            np.abs(
                np.asarray(
                    find_displacements(refs[:, 0], refs, cc_type=cc_type, **kw).dxdy
                )
            ).max()
        )
        for kw in runs
    )


def end_to_end_rows(seeds=(0, 1, 2), **options) -> list[tuple]:
    """``(seed, image, misregistration px, rotation error arcsec, status)``."""
    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as outdir:
            sim = simulate_exposures(outdir, seed=seed)
            result, _ = align_files(sim.paths, reference=0, **options)
            for i in range(1, len(sim.paths)):
                found = recovered_error(sim, i, result.final_wcs[i])
                rows.append(
                    (
                        seed,
                        i,
                        misregistration(sim, i, result.final_wcs[i]),
                        3600.0 * (found.rotation - sim.errors[i].rotation),
                        f"{result.status} after {result.n_iterations}",
                    )
                )
    return rows


def print_end_to_end() -> None:
    """Print the end-to-end rows of the default options and of the former ones."""
    for label, options in (
        ("default options", {}),
        (
            "former default: weighting='catalog', clip_normalized=False",
            {"weighting": "catalog", "clip_normalized": False},
        ),
    ):
        rows = end_to_end_rows(**options)
        print()
        print(f"{label}, default simulated set: residual misregistration")
        print("| seed | image | misregistration (px) | rotation error (arcsec) | run |")
        print("|---|---|---|---|---|")
        for seed, i, mis, rot, status in rows:
            print(f"| {seed} | {i} | {mis:.4f} | {rot:+.3f} | {status} |")
        mis = np.array([r[2] for r in rows])
        rot = np.array([r[3] for r in rows])
        print(
            f"RMS {np.sqrt(np.mean(mis**2)):.4f} px, max {mis.max():.4f} px; rotation "
            f"mean {rot.mean():+.3f} arcsec, max |.| {np.abs(rot).max():.3f} arcsec"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 cases per kind")
    parser.add_argument(
        "--no-end-to-end", action="store_true", help="skip the end-to-end rows"
    )
    opts = parser.parse_args()
    per_kind = 30 if opts.quick else 150
    n_src = per_kind * len(KINDS)
    rows = []
    compile_s = None
    per_source = []
    refine = functools.partial(refine_displacements, n_iter=REFINE_ITERATIONS)
    with jax.enable_x64(True):
        for snr in SNRS:
            rng = np.random.default_rng(500 + snr)
            cases = [
                make_case(k, snr, SIZE, rng) for k in KINDS for _ in range(per_kind)
            ]
            images = np.stack([c.image for c in cases])
            refs = np.stack([c.refs for c in cases])
            truth = -np.stack([c.shift for c in cases])
            im32, ref32 = images.astype(np.float32), refs.astype(np.float32)
            variances = np.stack([c.variance for c in cases])
            cc = find_displacements(im32, ref32, variances=variances.astype(np.float32))
            plain = find_displacements(im32, ref32)
            lagrange = find_displacements(im32, ref32, peak_fit="lagrange")
            quad = find_displacements(im32, ref32, peak_fit="quadratic")
            orig = find_displacements(im32, ref32, exact_original=True)
            cc_dxdy = np.asarray(cc.dxdy, np.float64)
            # The pipeline's precision and iterations (core.measure.refine_batch).
            args = tuple(
                jnp.asarray(
                    a, REFINE_DTYPE if np.issubdtype(a.dtype, np.floating) else None
                )
                for a in map(
                    np.asarray, refinement_inputs(images, variances, refs, cc_dxdy)
                )
            )
            if compile_s is None:
                t0 = time.perf_counter()
                refine_displacements.lower(*args, n_iter=REFINE_ITERATIONS).compile()
                compile_s = time.perf_counter() - t0
                jax.block_until_ready(refine(*args))
            times, cc_times = [], []
            for _ in range(3):
                t0 = time.perf_counter()
                out = jax.block_until_ready(refine(*args))
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                jax.block_until_ready(
                    find_displacements(
                        im32, ref32, variances=variances.astype(np.float32)
                    )
                )
                cc_times.append(time.perf_counter() - t0)
            per_source.append((np.median(times) / n_src, np.median(cc_times) / n_src))
            refined = np.asarray(out.dxdy)
            # skimage returns the shift that moves the moving image onto the
            # reference: (row, col) of B_00 relative to the image, i.e. -s.
            sk = np.array(
                [
                    phase_cross_correlation(
                        c.image, c.refs[0], upsample_factor=100, normalization=None
                    )[0][::-1]
                    for c in cases
                ]
            )
            sk = -sk
            if chi2_shift is not None:
                c2 = np.array(
                    [
                        chi2_shift(c.refs[0], c.image, err=np.sqrt(c.variance))[:2]
                        for c in cases
                    ]
                )
            for i, kind in enumerate(KINDS):
                sel = slice(i * per_kind, (i + 1) * per_kind)
                crb = np.stack(
                    [cramer_rao_bound(c.params, SIZE) for c in cases[sel][:30]]
                )
                bound = float(np.sqrt(np.mean(crb**2)))
                row = {
                    "kind": kind,
                    "snr": snr,
                    "crb": bound,
                    "cc": _rms(cc_dxdy[sel] - truth[sel]),
                    "plain": _rms(np.asarray(plain.dxdy)[sel] - truth[sel]),
                    "lagrange": _rms(np.asarray(lagrange.dxdy)[sel] - truth[sel]),
                    "quad": _rms(np.asarray(quad.dxdy)[sel] - truth[sel]),
                    "orig": _rms(np.asarray(orig.dxdy)[sel] - truth[sel]),
                    "pull_cc": _pull(
                        cc_dxdy[sel] - truth[sel], np.asarray(cc.sigma)[sel]
                    ),
                    "pull_plain": _pull(
                        np.asarray(plain.dxdy)[sel] - truth[sel],
                        np.asarray(plain.sigma)[sel],
                    ),
                    "pull_orig": _pull(
                        np.asarray(orig.dxdy)[sel] - truth[sel],
                        np.asarray(orig.sigma)[sel],
                    ),
                    "pull_refine": _pull(
                        refined[sel] - truth[sel], np.asarray(out.sigma)[sel]
                    ),
                    "refine": _rms(refined[sel] - truth[sel]),
                    "skimage": _rms(sk[sel] - truth[sel]),
                    "chi2": _rms(c2[sel] - truth[sel])
                    if chi2_shift is not None
                    else None,
                }
                rows.append(row)
    print(
        f"per-axis RMS error (px) / (RMS/CRB), {SIZE}x{SIZE}, {per_kind} cases per kind"
    )
    methods = ("cc", "plain", "lagrange", "quad", "orig", "refine", "skimage", "chi2")
    print(
        "| kind | S/N | CRB | xcorr default | xcorr unweighted | xcorr lagrange "
        "| xcorr quadratic | original | refine | skimage pcc (up 100) | chi2_shift "
        "| pull default / unweighted / original / refine |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            f"{r[m]:.5f} ({r[m] / r['crb']:.2f})" if r[m] is not None else "n/a"
            for m in methods
        ]
        pulls = " / ".join(
            f"{r[k]:.2f}" for k in ("pull_cc", "pull_plain", "pull_orig", "pull_refine")
        )
        print(
            f"| {r['kind']} | {r['snr']} | {r['crb']:.5f} | "
            + " | ".join(cells)
            + f" | {pulls} |"
        )
    print()
    print("image = reference (true displacement 0): max |d| px")
    print("| case | cc_type | default | overlap_normalise | original |")
    print("|---|---|---|---|---|")
    for case, cc_type, new, per_lag, old in zero_shift_rows():
        print(f"| {case} | {cc_type} | {new:.1e} | {per_lag:.1e} | {old:.1e} |")
    if chi2_shift is None:
        print("image_registration not importable: chi2_shift skipped")
    refine_us, cc_us = 1e6 * np.median(per_source, axis=0)
    print(
        f"refine_displacements ({n_src} sources, {np.dtype(REFINE_DTYPE).name}, "
        f"poly5, {REFINE_ITERATIONS} LM iterations): compile {compile_s:.1f} s, "
        f"median {refine_us:.0f} us per source, {refine_us / cc_us:.1f}x the "
        f"default path's {cc_us:.0f} us (find_displacements, given the four blots)"
    )
    if not opts.no_end_to_end:
        print_end_to_end()


if __name__ == "__main__":
    main()
