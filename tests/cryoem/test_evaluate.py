"""``cryoem.evaluate`` on every kind of simulation: the truth scores itself perfectly, noise scores near zero."""

import numpy as np
import pytest

from cryoem.cli import main
from cryoem.evaluate import linear_r2, truth

from .test_conventions import DATA


@pytest.mark.parametrize("kind", ["hinge2", "ensemble"])
def test_truth_as_latent_scores_one(tmp_path, kind):
    args = (["--structure", str(DATA / "1ubi.pdb"), "--select", "ca", "--hinge", "A:60-76:40", "--hinge", "A:1-10:30"]
            if kind == "hinge2" else ["--structure", str(DATA / "2k39_ca_10models.pdb")])
    assert main(["simulate", *args, "--n", "400", "--box", "32", "--apix", "3", "--quiet", "--out",
                 str(tmp_path)]) == 0
    tr = truth(tmp_path)
    assert tr.coord.shape == ((400, 2) if kind == "hinge2" else (400, 1))
    z = np.concatenate([tr.coord, np.random.default_rng(0).normal(size=(400, 2))], 1)
    assert min(linear_r2(z, tr.coord)) > 0.999
    assert max(linear_r2(np.random.default_rng(1).normal(size=(400, 4)), tr.coord)) < 0.05
    for _, _, label in tr.bins():  # the true model of a bin is the truth at its mean label
        if kind == "ensemble":
            assert np.allclose(tr.model_at(label), tr.models.coords[label])
    if kind == "hinge2":  # bilinear interpolation reproduces a grid model exactly and lies between neighbours
        assert np.allclose(tr.model_at([0.25, 0.5]), tr.models.coords[7], atol=1e-3)
        mid = tr.model_at([0.125, 0.5])
        assert np.allclose(mid, (tr.models.coords[2] + tr.models.coords[7]) / 2, atol=1e-3)
