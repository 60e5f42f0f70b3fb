#!/usr/bin/env bash
# Align FITS exposures from the command line, store the solution, redraw the
# convergence plot and apply the solution to other copies of the files.
#
#   bash examples/align_from_command_line.sh [WORKDIR]
#
# Small settings for a quick run: SUBPIXAL_CHIP_SHAPE=128x256 SUBPIXAL_N=3
# SUBPIXAL_NMAX=2. Nothing is written outside WORKDIR (default: a new
# temporary directory).
set -euo pipefail

work=${1:-$(mktemp -d -t subpixal-cli-XXXXXX)}
chip=${SUBPIXAL_CHIP_SHAPE:-512x1024}
n=${SUBPIXAL_N:-4}
nmax=${SUBPIXAL_NMAX:-5}
python=${PYTHON:-python}
mkdir -p "$work/data" "$work/corrected" "$work/applied" "$work/plots"

# Simulated dithered two-chip exposures with known WCS errors (any FITS
# files with SCI/ERR/DQ extensions and a celestial WCS will do instead).
"$python" - "$work/data" "$chip" "$n" <<'PY'
import sys
from subpixal_jax.simulate import simulate_exposures
rows, cols = (int(v) for v in sys.argv[2].split("x"))
simulate_exposures(sys.argv[1], n_exposures=int(sys.argv[3]), chip_shape=(rows, cols))
PY

# Align: hold the first exposure fixed, write corrected copies (the inputs
# stay untouched; --in-place would update them with the old WCS archived),
# the summary with the solution, and diagnostic PNGs.
subpixal-jax align "$work"/data/sim*_flt.fits \
    --reference 0 --nmax "$nmax" \
    --output-dir "$work/corrected" \
    --summary "$work/summary.ecsv" \
    --plots "$work/plots" || test $? -eq 1  # exit 1: ran, but not converged

# Redraw the convergence figure from the saved summary.
subpixal-jax plot "$work/summary.ecsv" --output "$work/convergence.png"

# Apply the stored solution to other copies of the (uncorrected) files; the
# reference exposure has no correction, so it is left out.
subpixal-jax apply "$work/summary.ecsv" "$work"/data/sim0[1-9]_flt.fits \
    --output-dir "$work/applied"

ls "$work/corrected" "$work/applied" "$work/plots"
