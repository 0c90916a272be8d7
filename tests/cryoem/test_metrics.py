"""FSC, resolution thresholds, AU-FSC, map correlation and `cryoem fsc`."""

import numpy as np
import pytest
import torch

from cryoem.cli import main
from cryoem.formats.mrc import write_mrc
from cryoem.metrics import au_fsc, fsc, fsc_report, map_correlation, resolution_at
from cryoem.structure import read_structure, scattering_gaussians
from renderers.gaussian import gaussian_density_map

from .test_conventions import DATA


@pytest.fixture(scope="module")
def ubi_map():
    s = read_structure(DATA / "1ubi.pdb").select("heavy")
    _, amp, sig = scattering_gaussians(s, bfactor=10.0)
    xyz = torch.as_tensor(s.coords[0] - s.centroid())
    return gaussian_density_map(xyz, torch.as_tensor(amp), torch.as_tensor(sig), 40, 1.5).numpy()


def lowpass(vol, apix, res):
    D = vol.shape[0]
    k = np.fft.fftfreq(D, apix)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    return np.fft.ifftn(np.fft.fftn(vol) * (np.sqrt(kx**2 + ky**2 + kz**2) <= 1 / res)).real


def test_identical_maps(ubi_map):
    freq, curve = fsc(ubi_map, ubi_map, 1.5)
    assert np.allclose(curve, 1.0) and freq[-1] == pytest.approx(1 / 3.0)
    assert au_fsc(freq, curve) == pytest.approx(1.0)
    assert resolution_at(freq, curve, 0.143) == pytest.approx(3.0)
    assert map_correlation(ubi_map, ubi_map) == pytest.approx(1.0)


def test_lowpassed_map_has_its_cutoff_as_resolution(ubi_map):
    filt = lowpass(ubi_map, 1.5, 6.0)
    r = fsc_report(ubi_map, filt, 1.5)
    assert 5.4 < r["res_0.143"] < 6.6 and 5.4 < r["res_0.5"] < 6.6
    assert 0.3 < r["au_fsc"] < 0.7


def test_noise_lowers_fsc_and_correlation(ubi_map):
    rng = np.random.default_rng(0)
    noisy = ubi_map + rng.normal(scale=ubi_map.std() * 2, size=ubi_map.shape)
    freq, curve = fsc(ubi_map, noisy, 1.5)
    assert curve[1] > 0.8 and curve[-1] < 0.3
    assert map_correlation(ubi_map, noisy) < 0.6
    assert fsc_report(ubi_map, noisy, 1.5)["res_0.5"] > 3.0


def test_bad_shapes():
    with pytest.raises(ValueError):
        fsc(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def test_cli_fsc_prints_and_plots(tmp_path, ubi_map, capsys):
    write_mrc(tmp_path / "a.mrc", ubi_map, 1.5)
    write_mrc(tmp_path / "b.mrc", lowpass(ubi_map, 1.5, 6.0), 1.5)
    assert main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "--plot", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr().out
    assert "FSC=0.143" in out and "AU-FSC" in out and (tmp_path / "f.png").stat().st_size > 1000
    write_mrc(tmp_path / "c.mrc", np.zeros((8, 8, 8)), 1.0)
    assert main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "c.mrc")]) == 2
    assert "differs" in capsys.readouterr().err


def test_cli_fsc_refuses_a_map_with_a_nan_voxel(tmp_path, ubi_map, capsys):
    import mrcfile

    write_mrc(tmp_path / "a.mrc", ubi_map, 1.5)
    bad = ubi_map.astype(np.float32).copy()
    bad[3, 4, 5] = np.nan
    with mrcfile.new(tmp_path / "nan.mrc") as m:  # write_mrc itself refuses NaN
        m.set_data(bad)
        m.voxel_size = 1.5
    capsys.readouterr()
    assert main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "nan.mrc")]) == 2
    out, err = capsys.readouterr()
    assert "resolution" not in out
    assert "nan.mrc: 1 voxels are NaN" in err and "(3, 4, 5)" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="NaN"):
        fsc(ubi_map, bad)
