"""Tests of the ``subpixal-jax`` command line."""

import pytest

from subpixal_jax.apps.cli import main
from subpixal_jax.simulate import load_truth


def test_demo_writes_files_and_prints_errors(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--output-dir",
            str(tmp_path),
            "--seed",
            "3",
            "--chip-shape",
            "64x128",
            "--n-exposures",
            "3",
            "--simulate-only",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    truth = load_truth(tmp_path / "sim_truth.ecsv")
    assert [p.name for p in truth.paths] == [f"sim0{i}_flt.fits" for i in range(3)]
    assert all(p.is_file() for p in truth.paths)
    assert str(tmp_path) in out
    assert "2 chip(s) of 64x128 pixels" in out
    for path, err in zip(truth.paths, truth.errors, strict=True):
        line = next(row for row in out.splitlines() if row.startswith(path.name))
        fields = line.split()
        assert float(fields[1]) == pytest.approx(err.shift[0], abs=1e-4)
        assert float(fields[2]) == pytest.approx(err.shift[1], abs=1e-4)
        assert float(fields[3]) == pytest.approx(err.rotation, abs=1e-5)


def test_demo_reports_bad_settings(tmp_path, capsys):
    code = main(["demo", "--output-dir", str(tmp_path), "--n-exposures", "0"])
    assert code == 2
    assert "n_exposures" in capsys.readouterr().err


def test_demo_rejects_malformed_chip_shape(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--chip-shape", "big"])
    assert "ROWSxCOLS" in capsys.readouterr().err


def test_ctrl_c_ends_with_a_message_not_a_traceback(monkeypatch, capsys):
    from subpixal_jax.apps import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_demo", interrupted)
    assert main(["demo"]) == 130
    err = capsys.readouterr().err
    assert "subpixal-jax demo: interrupted" in err
    assert "Traceback" not in err
