"""Tests of subpixal_jax.io.images: reading exposures, masks, units, errors."""

import importlib.resources

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from subpixal_jax.io.images import Exposure, read_exposure


def _wcs(crpix=(16.0, 12.0)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, -20.0]
    w.wcs.crpix = list(crpix)
    w.wcs.cd = [[-1e-5, 0.0], [0.0, 1e-5]]
    return w


def _hdul(n_chips=2, *, bunit="ELECTRONS", exptime=100.0, shape=(24, 32)):
    hdus = [fits.PrimaryHDU()]
    if exptime is not None:
        hdus[0].header["EXPTIME"] = exptime
    rng = np.random.default_rng(1)
    for v in range(1, n_chips + 1):
        h = _wcs((16.0, 12.0 - shape[0] * (v - 1))).to_header()
        h["BUNIT"] = bunit
        sci = fits.ImageHDU(rng.normal(10, 1, shape).astype(np.float32), h, "SCI")
        err = fits.ImageHDU(np.ones(shape, np.float32), name="ERR")
        dq = fits.ImageHDU(np.zeros(shape, np.int16), name="DQ")
        for hdu in (sci, err, dq):
            hdu.header["EXTVER"] = v
        dq.data[0, :4] = [0, 4, 8, 16]
        hdus += [sci, err, dq]
    return fits.HDUList(hdus)


def test_multichip_read_and_masks():
    hdul = _hdul(2)
    before = hdul[1].data.copy()
    exp = read_exposure(hdul)
    assert isinstance(exp, Exposure)
    assert [c.extver for c in exp.chips] == [1, 2]
    assert exp.units == "counts"
    assert exp.exptime == 100.0
    c = exp.chips[0]
    assert c.data.dtype == np.float32
    assert c.err is not None
    assert c.err.dtype == np.float32
    assert c.wcs.pixel_shape == (32, 24)
    np.testing.assert_array_equal(c.valid[0, :4], [True, False, False, False])
    # dq_bits are bits to IGNORE, in every usual syntax
    for bits, expect in [
        (4, [True, True, False, False]),
        ("4,8", [True, True, True, False]),
        ("4+8", [True, True, True, False]),
        ("~4", [True, False, True, True]),
        (None, [True, True, True, True]),
    ]:
        got = read_exposure(hdul, dq_bits=bits).chips[1].valid[0, :4]
        np.testing.assert_array_equal(got, expect, err_msg=str(bits))
    # library-owned copies: the HDUList is untouched
    c.data[:] = 0
    np.testing.assert_array_equal(hdul[1].data, before)


def test_rate_units_nan_and_primary_image(tmp_path):
    hdul = _hdul(1, bunit="ELECTRONS/S")
    hdul[1].data[3, 5] = np.nan
    exp = read_exposure(hdul)
    assert exp.units == "rate"
    assert not exp.chips[0].valid[3, 5]

    prim = fits.PrimaryHDU(np.ones((10, 12), np.float32), _wcs().to_header())
    prim.header["EXPTIME"] = 5.0
    path = tmp_path / "single.fits"
    fits.HDUList([prim]).writeto(path)
    exp = read_exposure(path)
    assert exp.path == path
    assert exp.name == str(path)
    assert len(exp.chips) == 1
    assert exp.chips[0].extver == 1
    assert exp.chips[0].err is None
    assert exp.chips[0].valid.all()


def test_real_hrc_image():
    ref = importlib.resources.files("spherical_geometry") / "tests/data"
    with importlib.resources.as_file(ref / "j8bt06nyq_flt.fits") as path:
        exp = read_exposure(path)
    assert exp.units == "counts"
    assert exp.exptime > 0
    assert len(exp.chips) == 1
    c = exp.chips[0]
    assert c.shape == (1024, 1024)
    assert 0.5 < c.valid.mean() < 1.0


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda h: h[0].header.remove("EXPTIME"), "EXPTIME"),
        (lambda h: h[0].header.set("EXPTIME", 0.0), "EXPTIME must be positive"),
        (lambda h: h[0].header.set("EXPTIME", "abc"), "EXPTIME"),
        (lambda h: h.pop(1), "no 'SCI'"),
        (lambda h: h[1].header.set("CTYPE1", "PIXEL"), "celestial"),
        (lambda h: setattr(h[1], "data", np.zeros((0, 3), np.float32)), "empty"),
        (lambda h: h[1].data.fill(np.nan), "no valid"),
        (lambda h: setattr(h[3], "data", np.zeros((3, 3), np.int16)), "DQ"),
    ],
)
def test_bad_inputs(mutate, match):
    hdul = _hdul(1)
    mutate(hdul)
    with pytest.raises(ValueError, match=match):
        read_exposure(hdul)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dq_bits"):
        read_exposure(_hdul(1), dq_bits="4+x")
    with pytest.raises(ValueError, match="extname"):
        read_exposure(_hdul(1), extname="")
    with pytest.raises(ValueError, match="no such file"):
        read_exposure(tmp_path / "missing.fits")
    with pytest.raises(ValueError, match="source"):
        read_exposure(3.5)


def test_all_zero_image_is_named(tmp_path):
    # Regression (issue #15): an all-zero exposure used to make every image it
    # overlaps fail; now reading it names it.
    hdul = _hdul(2)
    for ext in (1, 4):
        hdul[ext].data[:] = 0.0
    path = tmp_path / "zero_flt.fits"
    hdul.writeto(path)
    with pytest.raises(ValueError, match=r"zero_flt\.fits: the image is empty"):
        read_exposure(path)
    hdul[4].data[5, 5] = 1.0  # one chip with signal is enough
    assert len(read_exposure(hdul).chips) == 2


def test_truncated_file_is_named(tmp_path):
    # Regression (issue #15): "cannot reshape array of size 62280 into shape".
    path = tmp_path / "short_flt.fits"
    _hdul(1).writeto(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: 2 * 2880 + 1000])  # inside the SCI data
    with pytest.raises(ValueError, match=r"short_flt\.fits.*truncated"):
        read_exposure(path)
