"""Known sub-pixel shifts recovered at the standard conditions (docs/accuracy.md)."""

import numpy as np
import pytest

from subpixal_jax.core.xcorr import find_displacements
from subpixal_jax.testing.accuracy import KINDS, cramer_rao_bound, make_case

SIZE = 25
TRIALS = 200
#: Required per-axis RMS error (px) at each peak S/N (default peak fit).
LIMITS = {20: 0.030, 100: 0.0065, 1000: 0.0010}
#: The same for the original quadratic peak fit, limited by grid locking.
QUADRATIC_LIMITS = {20: 0.030, 100: 0.0075, 1000: 0.0045}
#: Two standard errors of an RMS estimated from 2 * TRIALS samples.
SAMPLING = 2.0 / np.sqrt(4 * TRIALS)


@pytest.fixture(scope="module")
def results():
    """One batched call per (kind, S/N) case, all in one bucket shape."""
    table = {}
    for kind in KINDS:
        for snr in LIMITS:
            rng = np.random.default_rng(2024 + snr)
            cases = [make_case(kind, snr, SIZE, rng) for _ in range(TRIALS)]
            refs = np.stack([c.image for c in cases]).astype(np.float32)
            blots = np.stack([c.refs for c in cases]).astype(np.float32)
            out = find_displacements(refs, blots)
            err = np.asarray(out.dxdy) + np.stack([c.shift for c in cases])
            quad = find_displacements(refs, blots, peak_fit="quadratic")
            quad_err = np.asarray(quad.dxdy) + np.stack([c.shift for c in cases])
            variances = np.stack([c.variance for c in cases]).astype(np.float32)
            noise = find_displacements(refs, blots, variances=variances)
            quad_noise = find_displacements(
                refs, blots, variances=variances, peak_fit="quadratic"
            )
            # The bound varies smoothly between cases: 50 of them suffice.
            crb = np.stack([cramer_rao_bound(c.params, SIZE) for c in cases[:50]])
            table[kind, snr] = {
                "flags": np.asarray(out.flags),
                "rms": float(np.sqrt(np.mean(err**2))),
                "rms_xy": np.sqrt(np.mean(err**2, axis=0)),
                "crb": float(np.sqrt(np.mean(crb**2))),
                "sigma": float(np.sqrt(np.mean(np.asarray(out.sigma) ** 2))),
                "pull": float(np.std(err / np.asarray(out.sigma))),
                "quad_rms": float(np.sqrt(np.mean(quad_err**2))),
                "noise_pull": float(np.std(err / np.asarray(noise.sigma))),
                "quad_noise_pull": float(
                    np.std(quad_err / np.asarray(quad_noise.sigma))
                ),
                "quad_flags": np.asarray(quad.flags),
            }
    print(f"\nper-axis RMS error, {SIZE}x{SIZE}, {TRIALS} trials per case")
    print("kind      S/N   RMS(x, y)          CRB      RMS/CRB  sigma   pull  quad/CRB")
    for (kind, snr), r in table.items():
        print(
            f"{kind:9s} {snr:4d}  {r['rms_xy'][0]:.5f} {r['rms_xy'][1]:.5f}  "
            f"{r['crb']:.5f}  {r['rms'] / r['crb']:6.2f}  {r['sigma']:.5f}  "
            f"{r['pull']:.2f}  {r['quad_rms'] / r['crb']:6.2f}"
        )
    return table


@pytest.mark.parametrize("snr", sorted(LIMITS))
def test_known_shifts_recovered(results, snr):
    rms = [results[kind, snr]["rms"] for kind in KINDS]
    # Mean over the source types (as in docs/accuracy.md) within the limit ...
    assert np.sqrt(np.mean(np.square(rms))) <= LIMITS[snr]
    for kind in KINDS:
        r = results[kind, snr]
        assert np.all(r["flags"] == 0)
        # ... and every type within it up to the sampling error of 200 trials.
        assert r["rms"] <= LIMITS[snr] * (1 + SAMPLING)
        # Never better than the Cramér–Rao bound (a sanity check of both).
        assert r["rms"] >= 0.9 * r["crb"]


@pytest.mark.parametrize("snr", sorted(LIMITS))
def test_quadratic_peak_fit_is_kept(results, snr):
    rms = [results[kind, snr]["quad_rms"] for kind in KINDS]
    assert np.sqrt(np.mean(np.square(rms))) <= QUADRATIC_LIMITS[snr]
    for kind in KINDS:
        assert np.all(results[kind, snr]["quad_flags"] == 0)
    if snr == 1000:  # the interpolating polynomial removes the grid locking
        for kind in KINDS:  # measured 4.2-8.3x
            assert 3 * results[kind, snr]["rms"] <= results[kind, snr]["quad_rms"]


@pytest.mark.parametrize("snr", sorted(LIMITS))
def test_sigma_tracks_measured_error(results, snr):
    for kind in KINDS:
        r = results[kind, snr]
        # Moffat at S/N 1000: sigma / RMS 0.70, its errors are not all noise
        # (wings cut by the cutout); elsewhere 0.9-1.0.
        assert 0.6 < r["sigma"] / r["rms"] < 1.3
        # Pulls (error / sigma) measured 1.04-1.15, 1.4-1.6 for the Moffat
        # profile at S/N 1000.
        assert 0.9 < r["pull"] < 1.7


def test_crb_matches_accuracy_notes():
    # docs/accuracy.md: mean bound 0.0258 / 0.0044 / 0.0004 px over kinds and sizes.
    rng = np.random.default_rng(0)
    for snr, expected in ((20, 0.0258), (100, 0.0044)):
        crb = [
            cramer_rao_bound(make_case(kind, snr, n, rng).params, n)
            for kind in KINDS
            for n in (25, 41)
            for _ in range(10)
        ]
        assert np.sqrt(np.mean(np.square(crb))) == pytest.approx(expected, rel=0.15)


def test_make_case_validates():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind"):
        make_case("airy", 20, 25, rng)
    with pytest.raises(ValueError, match="snr"):
        make_case("gaussian", 0, 25, rng)
    with pytest.raises(ValueError, match="n must"):
        make_case("gaussian", 20, 3, rng)


@pytest.mark.parametrize("snr", sorted(LIMITS))
def test_sigma_from_the_pixel_variances_is_honest(results, snr):
    # With the exposure's variances the errors propagate the noise itself:
    # pulls measured 0.99-1.04 (Lagrange; 1.62 for the Moffat at S/N 1000,
    # whose cut wings are no noise) and 0.85-1.09 (quadratic) at S/N 20 and
    # 100, where grid locking is still below the noise.
    for kind in KINDS:
        r = results[kind, snr]
        if not (kind == "moffat" and snr == 1000):
            assert 0.9 < r["noise_pull"] < 1.1
        if snr < 1000:
            assert 0.8 < r["quad_noise_pull"] < 1.15
