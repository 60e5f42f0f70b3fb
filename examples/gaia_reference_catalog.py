"""Build a reference catalog file for the absolute tie from Gaia DR3.

Needs network access and astroquery (``pip install astroquery``), which
subpixal_jax itself does not depend on: the alignment never goes online, it
reads the file this writes (``reference_catalog=`` / ``--reference-catalog``).
Not run by the test suite.

    python examples/gaia_reference_catalog.py 53.16 -27.79 --radius 3 \\
        --output gaia_dr3.ecsv
    subpixal-jax align *_flt.fits --reference-catalog gaia_dr3.ecsv ...

The ECSV holds the Gaia DR3 columns the alignment reads as they are (``ra``,
``dec``, ``ra_error``, ``dec_error``, ``pmra``, ``pmdec``, ``pmra_error``,
``pmdec_error``, ``parallax``, ``ref_epoch``, ``phot_g_mean_mag``); positions
are propagated to each exposure's date at alignment time.
"""

import argparse
import sys

#: Columns written (the alignment accepts Gaia DR3 names as they are).
COLUMNS = (
    "source_id",
    "ra",
    "dec",
    "ra_error",
    "dec_error",
    "pmra",
    "pmdec",
    "pmra_error",
    "pmdec_error",
    "parallax",
    "ref_epoch",
    "phot_g_mean_mag",
)


def query(ra: float, dec: float, radius_arcmin: float, max_mag: float) -> str:
    """ADQL of a Gaia DR3 cone search, brightest first."""
    return (
        f"SELECT {', '.join(COLUMNS)} FROM gaiadr3.gaia_source "
        "WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), "
        f"CIRCLE('ICRS', {ra:.8f}, {dec:.8f}, {radius_arcmin / 60.0:.8f})) "
        f"AND phot_g_mean_mag < {max_mag:g} "
        "ORDER BY phot_g_mean_mag"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ra", type=float, help="centre RA (deg, ICRS)")
    parser.add_argument("dec", type=float, help="centre Dec (deg, ICRS)")
    parser.add_argument(
        "--radius", type=float, default=3.0, help="cone radius (arcmin)"
    )
    parser.add_argument(
        "--max-mag", type=float, default=21.0, help="faintest G magnitude"
    )
    parser.add_argument("--output", default="gaia_dr3.ecsv", help="ECSV to write")
    args = parser.parse_args(argv)
    try:
        from astroquery.gaia import Gaia
    except ImportError:
        print(
            "this example needs astroquery (pip install astroquery) and network "
            "access; subpixal_jax itself only reads the file it writes",
            file=sys.stderr,
        )
        return 2
    from subpixal_jax.reference.refcat import read_reference_catalog

    adql = query(args.ra, args.dec, args.radius, args.max_mag)
    table = Gaia.launch_job_async(adql).get_results()
    table.meta["name"] = "Gaia DR3"
    table.write(args.output, format="ascii.ecsv", overwrite=True)
    # Read back as the alignment will: the columns and the epoch are checked.
    cat = read_reference_catalog(args.output)
    print(
        f"{args.output}: {len(cat)} Gaia DR3 sources within {args.radius:g} arcmin, "
        f"epoch {float(cat['ref_epoch'][0]) if len(cat) else float('nan'):.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
