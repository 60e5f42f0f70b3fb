"""Run every example script with small settings and check what it prints."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SMALL = ["--chip-shape", "128x256", "--n-exposures", "3", "--nmax", "2"]


def _run(args, *, env=None, timeout=300):
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=EXAMPLES.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _table_rows(stdout):
    """Rows of the per-exposure table: file name then numbers."""
    return [line.split() for line in stdout.splitlines() if line.startswith("sim0")]


def test_kernels_in_jax():
    out = _run(
        [
            sys.executable,
            EXAMPLES / "kernels_in_jax.py",
            "--steps",
            "5",
            "--n-sources",
            "8",
        ]
    )
    lines = out.splitlines()
    true = next(line for line in lines if "true shift" in line)
    found = next(line for line in lines if "recovered shift" in line)

    def numbers(line):
        return [float(v) for v in line.split("[")[1].rstrip("]").split()]

    assert numbers(found) == pytest.approx(numbers(true), abs=0.05)
    max_error = float(out.split("max error over the batch:")[1].split()[0])
    assert max_error < 0.05


@pytest.mark.slow
def test_align_simulated(tmp_path):
    out = _run(
        [
            sys.executable,
            EXAMPLES / "align_simulated.py",
            *SMALL,
            "--plots",
            str(tmp_path),
        ]
    )
    rows = _table_rows(out)
    assert len(rows) == 3
    for row in rows[1:]:
        before, after = float(row[-2]), float(row[-1])
        assert after < 0.5 * before
    assert (tmp_path / "subpixal_convergence.png").stat().st_size > 0


def test_apply_solution():
    out = _run([sys.executable, EXAMPLES / "apply_solution.py", *SMALL])
    assert out.count("wrote sim0") == 2
    rows = _table_rows(out)
    assert len(rows) == 3
    for row in rows[1:]:
        before, after, gap = float(row[1]), float(row[2]), float(row[3])
        assert after < 0.5 * before
        assert gap < 1e-3  # mas: the file holds the alignment's WCS


@pytest.mark.slow
def test_align_from_command_line(tmp_path):
    bindir = pathlib.Path(sys.executable).parent
    env = dict(os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    if shutil.which("subpixal-jax", path=env["PATH"]) is None:
        pytest.skip("the subpixal-jax console script is not installed")
    env.update(
        SUBPIXAL_CHIP_SHAPE="128x256",
        SUBPIXAL_N="3",
        SUBPIXAL_NMAX="2",
        PYTHON=sys.executable,
    )
    _run(["bash", EXAMPLES / "align_from_command_line.sh", str(tmp_path)], env=env)
    assert (tmp_path / "summary.ecsv").is_file()
    assert (tmp_path / "convergence.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "applied").iterdir()) == [
        "sim01_flt.fits",
        "sim02_flt.fits",
    ]
    assert any((tmp_path / "plots").glob("*_gallery.png"))
