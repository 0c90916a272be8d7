"""The atom VAE: starts at the starting model, recovers the image scale, and learns a 1-D motion."""

import math

import pytest
import torch

from cryoem.ctf import CTFParams
from cryoem.imaging import fourier_filter, project
from cryoem.vae import AtomVAE, AtomVAEConfig, estimate_noise_sigma
from renderers.cameras import axis_angle_to_matrix

BOX, APIX = 32, 2.0


def toy_model(n=40):
    t = torch.linspace(0, 4 * math.pi, n)
    x0 = torch.stack([8 * torch.cos(t), 8 * torch.sin(t), 4 * (t - 2 * math.pi)], -1)
    bonds = torch.stack([torch.arange(n - 1), torch.arange(1, n)], 1)
    return x0, bonds


def toy_data(n=256, seed=0, scale=3.0, swing=10.0, snr=2.0):
    """Particles of a helix whose top half swings by ``swing * u`` Å, u in [0, 1] the true coordinate.

    Views are near the z axis (0.2 rad spread) so that a tiny encoder sees the motion within a test's budget.
    """
    g = torch.Generator().manual_seed(seed)
    x0, bonds = toy_model()
    u = torch.rand(n, generator=g)
    coords = x0.expand(n, -1, -1).clone()
    coords[:, 20:, 0] += swing * u[:, None]
    R = axis_angle_to_matrix(0.2 * torch.randn(n, 3, generator=g))
    shift = torch.randn(n, 2, generator=g)
    ctf = CTFParams.create(torch.full((n,), 15000.0), amp_contrast=0.1).as_tensor().float()
    img = fourier_filter(project(coords, torch.ones(40), torch.full((40,), 2.0), R, APIX, BOX, shift),
                         APIX, None, CTFParams.from_tensor(ctf))
    img = scale * (img + img.std() / math.sqrt(snr) * torch.randn(img.shape, generator=g))
    batch = {"image": img, "R": R, "shift_A": shift, "ctf": ctf, "index": torch.arange(n)}
    return batch, u, x0, bonds


def make_model(x0, bonds, noise, **kw):
    cfg = AtomVAEConfig(zdim=1, enc_width=8, dec_hidden=64, dec_layers=2, **kw)
    return AtomVAE(cfg, x0, torch.ones(40), torch.full((40,), 2.0), bonds, BOX, APIX, 256, noise)


def test_starts_at_starting_model_and_finds_scale():
    batch, u, x0, bonds = toy_data(n=32, swing=0.0, snr=1e4)
    model = make_model(x0, bonds, 1.0)
    torch.testing.assert_close(model.decode(torch.randn(5, 1)), x0.expand(5, -1, -1), atol=0.05, rtol=0)
    s = model.init_scale(batch)
    assert abs(s / 3.0 - 1) < 0.01  # the data are 3x the unit-mass images
    terms = model.loss(batch, 0)
    assert terms["bond"].item() < 1e-3 and terms["clash"].item() < 1e-3  # the start is (almost) the model
    assert all(v.item() < 1e-10 for v in model.prior_terms(x0[None]).values())


@pytest.mark.parametrize("enc_reference", [True, False])
def test_learns_the_motion(enc_reference):
    torch.manual_seed(0)
    batch, u, x0, bonds = toy_data()
    model = make_model(x0, bonds, estimate_noise_sigma(batch["image"], 0.95), beta=0.1, enc_reference=enc_reference)
    model.init_scale(batch)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for step in range(300):
        idx = torch.randint(0, 256, (32,))
        terms = model.loss({k: v[idx] for k, v in batch.items()}, step)
        first = first or terms["rec"].item()
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    with torch.no_grad():
        mu, _ = model.encode(batch)
    rho = torch.corrcoef(torch.stack([mu[:, 0].argsort().argsort().float(), u.argsort().argsort().float()]))[0, 1]
    assert terms["rec"].item() < 0.7 * first
    assert abs(rho) > 0.8, f"latent vs true motion Spearman {rho:.2f}"
