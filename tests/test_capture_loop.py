"""Large initial offsets end to end: captured by the loop, or refused.

Three two-chip 256x512 exposures; exposure 0 is the fixed reference, the
others are off by tens to a hundred pixels (and a rotation), far outside the
cutouts the cross-correlation can search.
"""

import hashlib

import numpy as np
import pytest

from subpixal_jax.align import align_files
from subpixal_jax.apps.cli import main
from subpixal_jax.simulate import WcsError, misregistration, simulate_exposures
from subpixal_jax.status import ImageStatus, RunStatus

ERRORS = [
    WcsError((0.0, 0.0)),
    WcsError((23.0, -7.5), rotation=0.01),
    WcsError((-100.0, 40.0), rotation=-2.0),
]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_exposures(
        tmp_path_factory.mktemp("far"),
        n_exposures=3,
        chip_shape=(256, 512),
        seed=5,
        errors=ERRORS,
    )


def _digests(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_large_offsets_are_captured_and_aligned(sim):
    result, _ = align_files(sim.paths, reference=0, fitgeom="rscale")
    before = [misregistration(sim, i, sim.header_wcs[i]) for i in (1, 2)]
    after = [misregistration(sim, i, result.final_wcs[i]) for i in (1, 2)]
    print(f"{result.status}: {np.round(before, 2)} -> {np.round(after, 4)} px")
    assert result.status.status is RunStatus.CONVERGED
    assert min(before) > 20
    assert max(after) < 0.1
    assert [c is not None and c.ok for c in result.captures[1:]] == [True, True]
    assert [o.status for o in result.final_status[1:]] == [ImageStatus.SUCCESS] * 2


def test_without_capture_nothing_is_written_unless_forced(sim, tmp_path, capsys):
    out = tmp_path / "out"
    before = _digests(sim.paths)
    args = ["align", *map(str, sim.paths), "--reference", "0", "--capture", "off"]
    code = main([*args, "--output-dir", str(out), "--nmax", "3"])
    text = capsys.readouterr().out
    assert code == 1
    assert "SUCCESS" not in text
    assert not out.exists() or not any(out.iterdir())
    assert _digests(sim.paths) == before
