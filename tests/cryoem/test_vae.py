"""The atom VAE: starts at the starting model, recovers the image scale, and learns a 1-D motion."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import Tensor

from cryoem.ctf import CTFParams
from cryoem.imaging import fourier_filter, project
from cryoem.vae import AtomVAE, AtomVAEConfig, estimate_noise_sigma
from renderers.cameras import axis_angle_to_matrix, matrix_to_axis_angle

BOX, APIX = 32, 2.0
DATA = __import__("pathlib").Path(__file__).resolve().parents[1] / "data"


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
    for step in range(300):
        idx = torch.randint(0, 256, (32,))
        terms = model.loss({k: v[idx] for k, v in batch.items()}, step)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    with torch.no_grad():
        mu, _ = model.encode(batch)

        def rec(coords):  # mean over all particles, at the learnt image scale
            return model.reconstruction(batch["image"], model.render(coords, batch["R"], batch["shift_A"],
                                                                     batch["ctf"]), None).mean().item()

        true = x0.expand(len(u), -1, -1).clone()
        true[:, 20:, 0] += 10.0 * u[:, None]  # toy_data's motion
        start, fit, best = rec(x0.expand(len(u), -1, -1)), rec(model.decode(mu)), rec(true)
    rho = torch.corrcoef(torch.stack([mu[:, 0].argsort().argsort().float(), u.argsort().argsort().float()]))[0, 1]
    # the decoded models explain the images nearly as well as the true structures do (99 % measured)
    assert start - fit > 0.95 * (start - best), (start, fit, best)
    assert abs(rho) > 0.8, f"latent vs true motion Spearman {rho:.2f}"


def ubiquitin_views(n=2048, seed=1):
    """Noiseless C-alpha images of ubiquitin (1UBI) at uniform random rotations and ~1 px random shifts."""
    from cryoem.simulate import random_rotations
    from cryoem.structure import bonded_pairs, read_structure

    s = read_structure(DATA / "1ubi.pdb").select("ca")
    x0 = torch.tensor(s.coords[0] - s.coords[0].mean(0)).float()
    g = torch.Generator().manual_seed(seed)
    R = random_rotations(n, g).float()
    shift = torch.randn(n, 2, generator=g) * APIX
    ctf = CTFParams.create(torch.full((n,), 15000.0), amp_contrast=0.1).as_tensor().float()
    amp, sig = torch.ones(len(x0)), torch.full((len(x0),), 2.0)
    img = 3 * fourier_filter(project(x0.expand(n, -1, -1), amp, sig, R, APIX, BOX, shift), APIX, None,
                             CTFParams.from_tensor(ctf))
    model_args = (x0, amp, sig, torch.as_tensor(bonded_pairs(s)), BOX, APIX, n)
    return {"image": img, "ctf": ctf, "index": torch.arange(n)}, R, shift, model_args


def pose_errors(steps: int, heads: int = 4) -> tuple[Tensor, Tensor]:
    """Train the pose encoder alone (all steps are pose warm-up) on noiseless views with the true structure;
    returns the per-particle angular errors (degrees) and shift errors (px) of the inferred poses."""
    torch.manual_seed(0)
    batch, R, shift, args = ubiquitin_views()
    cfg = AtomVAEConfig(zdim=1, enc_width=16, dec_hidden=64, dec_layers=2, enc_reference=False, infer_poses=True,
                        pose_heads=heads, pose_warmup=steps)
    model = AtomVAE(cfg, *args, noise_sigma=1e-3 * batch["image"].std().item())
    assert abs(model.init_scale(batch) / 3.0 - 1) < 0.01  # no poses: the scale comes from the signal power
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        idx = torch.randint(0, len(R), (64,))
        terms = model.loss({k: v[idx] for k, v in batch.items()}, step)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    R_hat, shift_hat = model.infer_poses(batch)
    angle = matrix_to_axis_angle(R_hat @ R.transpose(1, 2)).norm(dim=-1) * 180 / math.pi
    return angle, ((shift_hat - shift) / APIX).norm(dim=-1)


def test_infer_poses_learns_poses():
    """1,000 steps (~30 s): far better than chance (uniform rotations: median error ~126 degrees)."""
    angle, shift = pose_errors(1000)
    assert angle.median() < 30, f"median angular error {angle.median():.1f} deg"
    assert shift.median() < 0.6, f"median shift error {shift.median():.2f} px"


@pytest.mark.slow
def test_infer_poses_recovers_poses_on_noiseless_data():
    """The stated accuracy of --infer-poses (docs): median angular error < 10 degrees after 5,000 steps
    (noiseless 32 px views of ubiquitin C-alpha atoms, 2 Å/px, 4 hypotheses)."""
    angle, shift = pose_errors(5000)
    assert angle.median() < 10, f"median angular error {angle.median():.1f} deg"
    assert (angle < 20).float().mean() > 0.75, f"only {(angle < 20).float().mean():.0%} within 20 degrees"
    assert shift.median() < 0.4, f"median shift error {shift.median():.2f} px"


def test_laplace_posterior_matches_the_exact_posterior():
    """With one latent dimension the posterior p(z | x) ∝ N(z; 0, 1) exp(-rec(z)) can be integrated on a grid.
    Gauss-Newton steps must land on its mode, and their Laplace variance must match the grid posterior's
    variance (the posterior is close to Gaussian here)."""
    torch.manual_seed(0)
    batch, u, x0, bonds = toy_data(n=6, snr=1.0)
    # a per-atom decoder (dec_smooth 0), so that random last-layer weights give random displacements of ~0.3 Å
    # per unit z (the smoothed decoder would average them out)
    model = make_model(x0, bonds, 1.0, posterior="laplace", gn_steps=8, particle_nuisance=False, dec_smooth=0.0)
    torch.nn.init.normal_(model.decoder.out.weight, std=0.02 / model.decoder.scale)  # z moves atoms ~0.3 Å
    model.init_scale(batch)
    with torch.no_grad():
        coords = model.decode(torch.full((6, 1), 0.7))  # the data: decoded at z = 0.7, plus white noise
        clean = model.render(coords, batch["R"], batch["shift_A"], batch["ctf"])
        sigma = 0.2 * clean.std()
        model.noise_sigma.fill_(sigma)
        batch["image"] = clean + sigma * torch.randn_like(clean)
        mu, precision, _ = model.laplace(batch, torch.zeros(6, 1))
        grid = torch.linspace(-3, 3, 601)
        nll = []
        for zg in grid:  # -log posterior on the grid, per particle
            m = model.render(model.decode(zg.expand(6, 1)), batch["R"], batch["shift_A"], batch["ctf"])
            nll.append(model.reconstruction(batch["image"], m, None) + 0.5 * zg**2)
        nll = torch.stack(nll, 1)  # (6, grid)
        w = torch.softmax(-nll, 1)
        mean = (w * grid).sum(1)
        var = (w * (grid - mean[:, None]) ** 2).sum(1)
    mode = grid[nll.argmin(1)]
    assert (mu[:, 0] - mode).abs().max() < 0.015, (mu[:, 0], mode)  # the grid step is 0.01
    assert ((mu[:, 0] - mean).abs() < 0.5 * var.sqrt()).all()  # the mode; the mean differs where p is skewed
    # Gauss-Newton drops the residual's curvature term, so its variance is close, not exact
    torch.testing.assert_close(1 / precision[:, 0, 0], var, rtol=0.3, atol=0)
    assert (var < 0.05).all()  # the data are informative: the posterior is much narrower than the prior


def test_laplace_recovers_each_particles_contrast_and_bfactor_with_its_latent():
    """Images made by the model at z = 0.7 and then given a known contrast and B-factor each (their Fourier
    transform times exp(c - B k^2 / 4), k in 1/Å, as cryo-EM's B-factor convention): the Gauss-Newton steps
    recover c, B and z together, and the run stores them per particle; without the nuisance, z absorbs them."""
    torch.manual_seed(0)
    batch, u, x0, bonds = toy_data(n=6, snr=1.0)
    model = make_model(x0, bonds, 1.0, posterior="laplace", gn_steps=10)
    torch.nn.init.normal_(model.decoder.out.weight, std=0.02 / model.decoder.scale)
    model.init_scale(batch)
    c_true = torch.tensor([-0.25, -0.1, 0.0, 0.1, 0.2, 0.3])
    b_true = torch.tensor([0.0, 40.0, -20.0, 60.0, 10.0, 25.0])
    with torch.no_grad():
        clean = model.render(model.decode(torch.full((6, 1), 0.7)), batch["R"], batch["shift_A"], batch["ctf"])
        k2 = (torch.fft.fftfreq(BOX, d=APIX)[:, None] ** 2 + torch.fft.rfftfreq(BOX, d=APIX)[None] ** 2)
        env = torch.exp(c_true[:, None, None] - b_true[:, None, None] * k2 / 4)
        blurred = torch.fft.irfft2(torch.fft.rfft2(clean[:, 0]) * env, s=(BOX, BOX))[:, None]
        model.noise_sigma.fill_(0.02 * clean.std())
        batch["image"] = blurred + model.noise_sigma * torch.randn_like(blurred)
        z, precision, nu = model.laplace(batch, torch.zeros(6, 1))
        off = AtomVAE(replace(model.cfg, particle_nuisance=False), x0, torch.ones(40), torch.full((40,), 2.0), bonds,
                      BOX, APIX, 256, 1.0)
        off.load_state_dict(model.state_dict())
        z_off, _, nu_off = off.laplace(batch, torch.zeros(6, 1))
    torch.testing.assert_close(nu[:, 0], c_true, atol=0.01, rtol=0)
    torch.testing.assert_close(nu[:, 1], b_true, atol=2.0, rtol=0)
    torch.testing.assert_close(z[:, 0], torch.full((6,), 0.7), atol=0.05, rtol=0)
    assert nu_off is None and (z_off[:, 0] - 0.7).abs().max() > 0.2
    model.train()
    model.loss(batch, 0)  # a training step stores each particle's nuisance for its next visit
    assert model.nuisance[:6].abs().sum() > 0 and not model.nuisance[6:].any()


def test_active_units_and_encoder_pooling():
    from cryoem.vae import enc_pooling
    from plato_core.objective import active_units

    mu = torch.zeros(500, 4)
    mu[:, 0] = torch.randn(500)  # variance 1: active
    mu[:, 1] = 0.3 * torch.randn(500)  # variance 0.09: active
    mu[:, 2] = 0.03 * torch.randn(500)  # variance 0.0009: not
    assert int(active_units(mu)) == 2
    assert [enc_pooling(b) for b in (32, 48, 64, 100, 128, 256, 320)] == [1, 1, 2, 2, 4, 8, 10]


def test_sample_precision_matches_torch_distributions():
    from cryoem.vae import sample_precision

    g = torch.Generator().manual_seed(0)
    M = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    A = M @ M.transpose(1, 2) + 0.5 * torch.eye(4, dtype=torch.float64)  # precisions
    mu = torch.randn(3, 4, generator=g, dtype=torch.float64)
    q = torch.distributions.MultivariateNormal(mu, precision_matrix=A)
    p = torch.distributions.MultivariateNormal(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    torch.manual_seed(1)
    z, kl = sample_precision(mu[:, None].expand(3, 100_000, 4), A[:, None].expand(3, 100_000, 4, 4))
    torch.testing.assert_close(kl[:, 0], torch.distributions.kl_divergence(q, p))
    cov = torch.stack([torch.cov(zi.T) for zi in z])
    torch.testing.assert_close(cov, torch.linalg.inv(A), atol=0.03 * torch.linalg.inv(A).abs().max().item(), rtol=0)
    sd = torch.linalg.inv(A).diagonal(dim1=-2, dim2=-1).sqrt().max().item()
    torch.testing.assert_close(z.mean(1), mu, atol=0.02 * sd, rtol=0)
    v = torch.tensor([1.0, 0.5, 0.1, 0.02], dtype=torch.float64)  # a diagonal prior N(0, diag(v))
    _, kl_v = sample_precision(mu, A, v)
    p_v = torch.distributions.MultivariateNormal(torch.zeros(4, dtype=torch.float64), torch.diag(v))
    torch.testing.assert_close(kl_v, torch.distributions.kl_divergence(q, p_v))


def test_whiten_keeps_the_decoded_models_and_aligns_the_latent_with_structural_change():
    """PX-EM: re-expressing z changes no decoded model and maps the encoder's means and the stored means the same
    way. Afterwards the aggregate posterior equals the prior N(0, diag(v)), v descending with max 1, and a unit
    step along any latent direction moves the atoms by the same RMS distance (checked by finite differences)."""
    torch.manual_seed(0)
    batch, u, x0, bonds = toy_data(n=256, snr=1e3)
    cfg = AtomVAEConfig(zdim=2, enc_width=8, dec_hidden=64, dec_layers=2)
    model = AtomVAE(cfg, x0, torch.ones(40), torch.full((40,), 2.0), bonds, BOX, APIX, 256, 1.0)
    model.init_scale(batch)
    torch.nn.init.normal_(model.decoder.out.weight, std=0.2 / model.decoder.scale)  # z moves atoms by Å
    z_true = torch.randn(256, 2) @ torch.tensor([[0.3, 0.1], [0.0, 0.2]]) + torch.tensor([0.2, -0.1])
    with torch.no_grad():  # data from the model itself, so that its posteriors are sharp and at z_true
        clean = model.render(model.decode(z_true), batch["R"], batch["shift_A"], batch["ctf"])
        model.noise_sigma.fill_(0.002 * clean.std())
        batch["image"] = clean + model.noise_sigma * torch.randn_like(clean)
        mu, A, _ = model.laplace(batch, z_true)
        agg = torch.cov(mu.T, correction=0) + torch.linalg.inv(A).mean(0)
        enc_before = model._encode(batch)[0]
        models_before = model.decode(mu)
    model.z_last[:] = mu
    model.z_seen[:] = True
    changed = model.whiten(mu.mean(0), agg)
    assert {id(p) for p in changed} == {id(p) for p in (model.decoder.mlp[0].weight, model.decoder.mlp[0].bias,
                                                       model.encoder.head.weight, model.encoder.head.bias)}
    with torch.no_grad():
        torch.testing.assert_close(model.decode(model.z_last), models_before, atol=1e-3, rtol=0)
        # the encoder's means went through the same affine map as the stored means: solve it from z_last
        X = torch.cat([mu, torch.ones(256, 1)], 1)
        M = torch.linalg.lstsq(X, model.z_last).solution
        torch.testing.assert_close(model._encode(batch)[0], torch.cat([enc_before, torch.ones(256, 1)], 1) @ M,
                                   atol=1e-4, rtol=1e-4)
        mu2, A2, _ = model.laplace(batch, model.z_last)
        agg2 = torch.cov(mu2.T, correction=0) + torch.linalg.inv(A2).mean(0)
        # mean squared atom displacement per unit step along each latent axis, by central differences
        h, msd = 1e-2, []
        for k in range(2):
            e = torch.zeros(2)
            e[k] = h
            d = (model.decode(mu2 + e) - model.decode(mu2 - e)) / (2 * h)
            msd.append((d**2).sum((1, 2)).mean() / 40)
    v = model.prior_var
    assert v[0] == 1 and v[1] <= 1 and v.min() > 0
    assert torch.linalg.eigvalsh(agg).max() < 0.2  # the test starts far from it ...
    torch.testing.assert_close(mu2.mean(0), torch.zeros(2), atol=0.01, rtol=0)  # ... and ends there
    torch.testing.assert_close(agg2, torch.diag(v), atol=0.02, rtol=0)
    torch.testing.assert_close(msd[0], msd[1], rtol=0.05, atol=0)


def test_warm_starts_converge_to_the_posterior_mode():
    """Each training step starts a particle's Gauss-Newton step from its last posterior mean, so repeated visits
    with the decoder fixed reach the mode of p(z | x) under the prior N(0, 2), found here on a grid, which one
    step from 0 does not."""
    torch.manual_seed(0)
    batch, u, x0, bonds = toy_data(n=6, snr=1.0)
    model = make_model(x0, bonds, 1.0, posterior="laplace", whiten_every=0, particle_nuisance=False)
    torch.nn.init.normal_(model.decoder.out.weight, std=0.1 / model.decoder.scale)  # non-linear in z
    model.init_scale(batch)
    model.prior_var.fill_(2.0)  # the prior N(0, 2)
    with torch.no_grad():
        clean = model.render(model.decode(torch.full((6, 1), 1.5)), batch["R"], batch["shift_A"], batch["ctf"])
        model.noise_sigma.fill_(0.3 * clean.std())
        batch["image"] = clean + model.noise_sigma * torch.randn_like(clean)
        grid = torch.linspace(-4, 4, 801)
        nll = torch.stack([model.reconstruction(batch["image"], model.render(model.decode(zg.expand(6, 1)), batch["R"],
                           batch["shift_A"], batch["ctf"]), None) + zg**2 / 4 for zg in grid], 1)
        mode = grid[nll.argmin(1)]
        one_step, _, _ = model.laplace(batch, torch.zeros(6, 1))
        model.encoder.head.weight.zero_()
        model.encoder.head.bias.zero_()  # the encoder guesses 0
        model.train()
        assert not model.z_seen.any()
        for step in range(6):
            model.loss(batch, step)
    assert model.z_seen[:6].all() and not model.z_seen[6:].any()
    assert (one_step[:, 0] - mode).abs().max() > 0.1  # one step from 0 falls short ...
    assert (model.z_last[:6, 0] - mode).abs().max() < 0.02, (model.z_last[:6, 0], mode)  # ... visits converge
    torch.testing.assert_close(model.encode(batch)[0][:, 0], model.laplace(batch, model.z_last[:6])[0][:, 0])


def test_lowpass_start_halves_the_amplitude_at_its_resolution_then_opens():
    """--lowpass-start R: at step 0 the filter is 1/2 at frequency 1/R Å⁻¹, and it is off after curriculum_steps."""
    x0, bonds = toy_model()
    model = make_model(x0, bonds, 1.0, lowpass_start=16.0, curriculum_steps=100)
    lp = model.lowpass(0)
    fy = torch.fft.fftfreq(BOX, d=APIX)
    k = int(torch.argmin((fy[: BOX // 2] - 1 / 16.0).abs()))  # the row whose frequency is nearest 1/16 Å⁻¹
    torch.testing.assert_close(lp[k, 0], (2.0 ** -((fy[k] * 16.0) ** 2)).to(lp.dtype))
    assert abs(float(lp[int(torch.argmin((fy - 1 / 16.0).abs())), 0]) - 0.5) < 0.02
    assert model.lowpass(100) == 1.0 and model.lowpass(None) == 1.0


def test_correlation_likelihood_is_pixels_times_one_minus_the_correlation():
    batch, u, x0, bonds = toy_data(n=4)
    model = make_model(x0, bonds, 1.0, likelihood="correlation", posterior="amortized")
    other = torch.randn_like(batch["image"])
    got = model.reconstruction(batch["image"], other, None)
    a, b = batch["image"].flatten(1).double(), other.flatten(1).double()
    corr = torch.stack([torch.corrcoef(torch.stack([a[i], b[i]]))[0, 1] for i in range(4)])
    torch.testing.assert_close(got.double(), BOX * BOX * (1 - corr), rtol=1e-4, atol=1e-3)


def test_prior_weights_scale_their_terms_in_the_loss():
    """--w-bond / --w-local / --w-clash: the loss grows by w x (pixels / 1000) x the term, from the same start."""
    batch, u, x0, bonds = toy_data(n=8)
    x0 = x0 * 1.05  # a stretched start, so that the starting model's bonds differ from the priors' references
    losses = {}
    for w in (0.0, 3.0):
        torch.manual_seed(0)
        model = make_model(x0 / 1.05, bonds, 1.0, w_bond=w, w_local=0.0, w_clash=0.0, posterior="amortized",
                           prior_samples=8)
        with torch.no_grad():
            model.decoder.x0.copy_(x0)  # decode to the stretched model: a bond term > 0
        torch.manual_seed(1)
        losses[w] = model.loss(batch, 1000)
    bond = losses[3.0]["bond"]
    assert bond.item() > 0.01
    torch.testing.assert_close(losses[3.0]["loss"] - losses[0.0]["loss"], 3.0 * BOX * BOX / 1000 * bond,
                               rtol=1e-4, atol=1e-4)


class _Decoder(torch.nn.Module):
    """x0 + a (z . q) + b (z . q)^2 e: linear in z for b = 0, quadratic along q otherwise."""

    def __init__(self, x0, q, e, a, b):
        super().__init__()
        self.x0, self.q, self.e, self.a, self.b = x0, q, e, a, b

    def forward(self, z):
        t = (z @ self.q)[:, None, None]
        return self.x0 + self.a * t * self.e + self.b * t**2 * self.e


def test_nonlinearity_is_zero_for_a_linear_decoder_and_analytic_for_a_quadratic_one():
    """--w-linear's term: the midpoint of each latent and the one half a batch away, decoded, against the mean of
    their two structures. For x(z) = x0 + b (z.q)^2 e the deviation is -b (t_i - t_j)^2 / 4 e per atom."""
    x0, bonds = toy_model()
    model = make_model(x0, bonds, 1.0, w_linear=1.0)
    g = torch.Generator().manual_seed(0)
    q, e = torch.tensor([0.6]), torch.randn(40, 3, generator=g)
    z = torch.randn(6, 1, generator=g)
    model.decoder = _Decoder(x0, q, e, 1.5, 0.0)
    assert model.nonlinearity(z, model.decode(z)).item() < 1e-10
    model.decoder = _Decoder(x0, q, e, 1.5, 0.7)
    t = (z @ q)
    d = 0.7 * (t - t.roll(3)) ** 2 / 4  # (6,): each pair's deviation per unit of e
    expected = (d**2).mean() * (e**2).sum(-1).mean()
    torch.testing.assert_close(model.nonlinearity(z, model.decode(z)), expected, rtol=1e-5, atol=0)


def test_w_linear_adds_its_weight_times_the_nonlinearity_to_the_loss():
    """--w-linear: the loss grows by w x (pixels / 1000) x the logged nonlinearity, from the same start and draws."""
    batch, u, x0, bonds = toy_data(n=8)
    losses = {}
    for w in (0.0, 3.0):
        torch.manual_seed(0)
        model = make_model(x0, bonds, 1.0, w_linear=w)
        with torch.no_grad():  # a decoder far from linear: large first-layer weights
            model.decoder.mlp[0].weight.mul_(50)
            model.decoder.out.weight.normal_(0, 0.05)
        torch.manual_seed(1)
        losses[w] = model.loss(batch, 1000)
    assert "linear" not in losses[0.0]
    term = losses[3.0]["linear"]
    assert term.item() > 1e-3
    torch.testing.assert_close(losses[3.0]["loss"] - losses[0.0]["loss"], 3.0 * BOX * BOX / 1000 * term,
                               rtol=1e-4, atol=1e-3)


def test_refine_poses_applies_learned_rotation_and_shift_corrections():
    """--refine-poses: particle i's pose becomes exp(0.1 d_i[:3]) R_i and shift_i + d_i[3:5] (Å)."""
    x0, bonds = toy_model()
    model = make_model(x0, bonds, 1.0, refine_poses=True)
    R, shift = axis_angle_to_matrix(torch.randn(3, 3)), torch.randn(3, 2)
    idx = torch.tensor([0, 5, 7])
    assert all(torch.allclose(a, b) for a, b in zip(model.pose(R, shift, idx), (R, shift)))  # starts at zero
    d = torch.randn(256, 5)
    with torch.no_grad():
        model.pose_delta.weight.copy_(d)
    R2, s2 = model.pose(R, shift, idx)
    torch.testing.assert_close(R2, axis_angle_to_matrix(0.1 * d[idx, :3]) @ R)
    torch.testing.assert_close(s2, shift + d[idx, 3:5])


def test_render_jvp_is_the_derivative_of_render():
    """The Gauss-Newton step's Jacobian: render_jvp's images and derivatives against central differences of
    render (float64), through the CTF, the particles' contrast and B-factor, and the image scale."""
    batch, u, x0, bonds = toy_data(n=4, snr=1e4)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    model = make_model(x0, bonds, 1.0).double()
    model.init_scale(batch)
    model.nuisance[:4] = torch.tensor([[0.2, 30.0], [-0.1, 0.0], [0.0, 80.0], [0.3, 10.0]], dtype=torch.float64)
    R, shift, ctf, index = batch["R"].double(), batch["shift_A"].double(), batch["ctf"].double(), batch["index"]
    coords = x0.double().expand(4, -1, -1) + 0.5 * torch.randn(4, 40, 3, dtype=torch.float64)
    tangents = torch.randn(4, 2, 40, 3, dtype=torch.float64)
    img, jvp = model.render_jvp(coords, tangents, R, shift, ctf, index)
    h = 1e-5
    fd = torch.cat([(model.render(coords + h * tangents[:, k], R, shift, ctf, index)
                     - model.render(coords - h * tangents[:, k], R, shift, ctf, index)) / (2 * h) for k in range(2)], 1)
    torch.testing.assert_close(img, model.render(coords, R, shift, ctf, index), rtol=0, atol=1e-12)
    torch.testing.assert_close(jvp, fd, rtol=0, atol=1e-7 * fd.abs().max().item())


def test_residue_kernel_is_a_normalised_gaussian_of_the_residue_centres():
    from cryoem.vae import residue_kernel

    g = torch.Generator().manual_seed(0)
    x0 = 12 * torch.rand(60, 3, generator=g, dtype=torch.float64)
    groups = torch.arange(60) // 3  # 20 residues of 3 atoms
    K = residue_kernel(x0, groups, 4.0).to_dense()
    centres = x0.view(20, 3, 3).mean(1).numpy()
    d = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    want = np.exp(-d**2 / 32) * (d < 10)
    np.testing.assert_allclose(K.numpy(), want / want.sum(1, keepdims=True), rtol=1e-12)


def test_smooth_decoder_moves_residues_by_the_smoothed_last_layer():
    from cryoem.vae import AtomDecoder, residue_kernel

    torch.manual_seed(0)
    x0, _ = toy_model()
    groups = torch.arange(40) // 4  # 10 residues of 4 atoms
    dec = AtomDecoder(x0, 2, 16, 2, scale=10.0, groups=groups, smooth=6.0)
    torch.nn.init.normal_(dec.out.weight)
    torch.nn.init.normal_(dec.out.bias)
    z = torch.randn(5, 2)
    raw = dec.out(dec.mlp(z)).view(5, 10, 3)  # per residue, before smoothing
    K = residue_kernel(x0, groups, 6.0).to_dense()
    want = 10.0 * torch.einsum("rs,bsc->brc", K, raw)[:, groups]
    torch.testing.assert_close(dec.displacement(z), want)
    # forward adds the starting model (exactly: comparing with x0 + want instead failed by 4 float32 ulps of 25 Å,
    # from the kernel's summation order, depending on the thread count)
    torch.testing.assert_close(dec(z), x0 + dec.displacement(z), atol=0, rtol=0)
    with torch.no_grad():  # a rigid translation passes unchanged (each row of the kernel sums to 1)
        dec.out.weight.zero_()
        dec.out.bias.copy_(torch.tensor([0.1, -0.2, 0.3]).repeat(10))
    torch.testing.assert_close(dec.displacement(z), torch.tensor([1.0, -2.0, 3.0]).expand(5, 40, 3))


def test_chain_blocks_blend_two_neighbouring_blocks_linearly_within_each_chain():
    from cryoem.vae import chain_blocks

    chain = torch.tensor([0] * 12 + [1] * 5)
    block, weight = chain_blocks(chain, 4)
    # chain 0: 3 blocks of 4 residues, centres at residues 1.5, 5.5, 9.5; chain 1: round(5 / 4) = 1 block (index 3)
    u = (torch.arange(12) + 0.5) / 4 - 0.5  # position in block units
    want = torch.stack([u.floor().clamp(0, 2), (u.floor() + 1).clamp(0, 2)], 1).long()
    frac = (u - u.floor()).where((u > 0) & (u < 2), torch.zeros(12))
    torch.testing.assert_close(block[:12, 0], want[:, 0])
    torch.testing.assert_close(block[:12, 1][frac > 0], want[:, 1][frac > 0])  # the second block where it counts
    torch.testing.assert_close(weight[:12, 1], frac)
    torch.testing.assert_close(weight.sum(1), torch.ones(17))
    assert (block[12:] == 3).all() and (weight[12:, 0] == 1).all()  # never a block of the other chain


def test_rigid_blocks_turn_and_move_each_block_as_a_rigid_body():
    from cryoem.vae import AtomDecoder

    torch.manual_seed(0)
    x0 = 15 * torch.randn(120, 3, dtype=torch.float64)
    groups = torch.arange(120) // 2  # 60 residues of 2 atoms, one chain: 3 blocks of 20
    dec = AtomDecoder(x0, 2, 16, 2, scale=0.5, groups=groups, smooth=0.0, rigid=(20,)).double()
    blocks = dec.rigid
    with torch.no_grad():
        dec.out.weight.zero_()
        blocks.out.weight.zero_()
        rotvec, shift = torch.tensor([0.3, -0.5, 0.4], dtype=torch.float64), torch.tensor([2.0, -1.0, 3.0],
                                                                                         dtype=torch.float64)
        bias = torch.zeros(3, 6, dtype=torch.float64)
        bias[0, :3], bias[0, 3:] = shift / 0.5, rotvec * blocks.radius[0] / 0.5  # block 0 only
        blocks.out.bias.copy_(bias.flatten())
    x = dec(torch.zeros(1, 2, dtype=torch.float64))[0]
    core = groups < 10  # residues 0-9: before block 0's centre (9.5), all in block 0
    c = blocks.centre[0]
    angle = rotvec.norm()
    k = rotvec / angle
    rel = x0[core] - c
    rodrigues = (rel * torch.cos(angle) + torch.linalg.cross(k.expand_as(rel), rel) * torch.sin(angle)
                 + k * (rel @ k)[:, None] * (1 - torch.cos(angle)))
    torch.testing.assert_close(x[core], c + rodrigues + shift)
    torch.testing.assert_close(x[groups >= 30], x0[groups >= 30])  # blocks 1 and 2 did not move: block 2 stays
    mid = (groups >= 10) & (groups < 30)  # between block 0's centre and block 1's: a linear blend of the two
    w0 = 1 - ((groups[mid] + 0.5) / 20 - 0.5)
    torch.testing.assert_close(x[mid], x0[mid] + w0[:, None] * (c + (x0[mid] - c) @ dec_rotation(rotvec).T + shift
                                                                 - x0[mid]))


@pytest.mark.parametrize("kind", ["atoms", "residues", "blocks"])
def test_decoder_units_place_the_atoms_where_the_decoder_does(kind):
    """``AtomDecoder.units`` (affine maps per unit, for the renderers to place the atoms) gives the structures of
    ``AtomDecoder.forward`` for a per-atom, a residue-smoothed and a two-level rigid-block decoder."""
    from cryoem.vae import AtomDecoder

    torch.manual_seed(1)
    x0 = 15 * torch.randn(120, 3, dtype=torch.float64)
    groups = torch.arange(120) // 2
    chains = (torch.arange(60) >= 35).long()  # two chains
    opts = {"atoms": {}, "residues": {"smooth": 6.0}, "blocks": {"smooth": 6.0, "rigid": (20, 7)}}[kind]
    dec = AtomDecoder(x0, 3, 16, 2, scale=0.5, groups=groups, chains=chains, **opts).double()
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_(0, 0.3)  # far from the near-zero start: rotations of tens of degrees
    z = torch.randn(5, 3, dtype=torch.float64)
    units = dec.units(z)
    assert units.maps.shape == (5, {"atoms": 120}.get(kind, 60), 3, 4)
    torch.testing.assert_close(units.centers(), dec(z), rtol=0, atol=1e-10)
    assert (dec(z) - x0).abs().max() > 0.1  # the atoms moved (10^9 times the tolerance)


def dec_rotation(v):
    from renderers.cameras import axis_angle_to_matrix

    return axis_angle_to_matrix(v[None])[0]


@pytest.mark.parametrize("truth", [1.5, -1.5])
def test_coarse_search_of_a_residue_model_starts_from_the_candidate_that_explains_the_image(truth):
    """As below, with a decoder that moves residues of four atoms: the search renders one merged Gaussian per residue,
    and must still pick the true latent of images made from the atoms."""
    torch.manual_seed(0)
    batch, u, x0, bonds = toy_data(n=6, snr=1.0)
    cfg = AtomVAEConfig(zdim=1, enc_width=8, dec_hidden=64, dec_layers=2, particle_nuisance=False, dec_smooth=4.0,
                        dec_rigid=(0,), search=4)
    model = AtomVAE(cfg, x0, torch.linspace(0.5, 1.5, 40), torch.full((40,), 1.0), bonds, BOX, APIX, 256, 1.0,
                    groups=torch.arange(40) // 4)
    assert cfg.coarse_search and len(model.coarse_points) == 10
    torch.nn.init.normal_(model.decoder.out.weight, std=0.1 / model.decoder.scale)
    model.init_scale(batch)
    with torch.no_grad():
        units = model.decoder.units(torch.full((6, 1), truth))
        clean = model.render(units, batch["R"], batch["shift_A"], batch["ctf"])
        coarse = model.render(units, batch["R"], batch["shift_A"], batch["ctf"], coarse=True)
        model.noise_sigma.fill_(0.3 * clean.std())
        batch["image"] = clean + 0.3 * clean.std() * torch.randn_like(clean)
        model.z_last[100], model.z_seen[100] = 1.5, True  # the only stored mean on offer
        start = model.search(batch, torch.full((6, 1), -1.5))
    torch.testing.assert_close(start, torch.full((6, 1), truth))
    assert (coarse - clean).norm() / clean.norm() > 0.4  # these residues span 7 Å: their merged images are far off


@pytest.mark.parametrize("truth", [1.5, -1.5])
def test_search_starts_from_the_candidate_that_explains_the_image(truth):
    """Particles imaged at z = ``truth``, warm-started at -1.5, with one other particle's stored mean
    at +1.5 on offer: the search must start every particle from the true latent, whichever it is."""
    torch.manual_seed(0)
    batch, u, x0, bonds = toy_data(n=6, snr=1.0)
    model = make_model(x0, bonds, 1.0, particle_nuisance=False, dec_smooth=0.0, dec_rigid=(0,), search=4)
    torch.nn.init.normal_(model.decoder.out.weight, std=0.05 / model.decoder.scale)  # z moves atoms by ~1 Å
    model.init_scale(batch)
    with torch.no_grad():
        clean = model.render(model.decode(torch.full((6, 1), truth)), batch["R"], batch["shift_A"], batch["ctf"])
        model.noise_sigma.fill_(0.3 * clean.std())
        batch["image"] = clean + 0.3 * clean.std() * torch.randn_like(clean)
        model.z_last[100], model.z_seen[100] = 1.5, True  # the only stored mean on offer
        wrong = torch.full((6, 1), -1.5)
        start = model.search(batch, wrong)
        torch.testing.assert_close(start, torch.full((6, 1), truth))
        model.cfg.search = 0
        assert model.search(batch, wrong) is wrong


def test_stale_stored_means_are_neither_warm_starts_nor_search_candidates(monkeypatch):
    """A stored posterior mean older than MAX_STALE_WHITENS re-expressions is not used: the warm start falls back to
    the encoder's guess, the search does not offer it, and the analysis encodes that particle again."""
    import cryoem.analyze as analyze
    import cryoem.particles
    from cryoem.vae import MAX_STALE_WHITENS

    batch, u, x0, bonds = toy_data(n=6)
    model = make_model(x0, bonds, 1.0, particle_nuisance=False, search=4)
    model._remember(batch, torch.full((6, 1), 2.0))  # visited at re-expression 0
    guess = torch.zeros(6, 1)
    for n, fresh in ((MAX_STALE_WHITENS, True), (MAX_STALE_WHITENS + 1, False)):
        model.n_whiten.fill_(n)
        assert bool((model.warm_start(batch, guess) == 2.0).all()) is fresh
        assert model.fresh()[:6].all().item() is fresh and not model.fresh()[6:].any()
    assert model.search(batch, guess) is guess  # nothing fresh to offer
    model._remember({"index": torch.tensor([100])}, torch.full((1, 1), -3.0))  # one fresh visit
    assert model.z_visit[100] == MAX_STALE_WHITENS + 1 and model.fresh().nonzero()[:, 0].tolist() == [100]
    assert set(model.search(batch, guess).flatten().tolist()) <= {0.0, -3.0}  # never the stale 2.0
    encoded = []
    monkeypatch.setattr(cryoem.particles, "ParticleSubset", lambda ds, idx: idx)
    monkeypatch.setattr(analyze, "encode_all",
                        lambda m, idx, progress=True, sample=True: encoded.append(idx) or np.zeros((len(idx), 1)))
    z, how = analyze.posterior_means(model, range(256), refine=False, progress=False)
    assert len(encoded[0]) == 255 and 100 not in encoded[0] and z[100, 0] == -3.0 and "re-expressions" in how
    before = int(model.n_whiten)
    model.whiten(torch.zeros(1), torch.eye(1))
    assert int(model.n_whiten) == before + 1


def test_on_a_large_data_set_re_expression_waits_for_a_quarter_epoch_so_stored_means_stay_fresh():
    """Up to WHITEN_EARLY_STEPS the latent is re-expressed every whiten_every steps; after that only when
    1 / WHITENS_PER_EPOCH of the particles have been visited since the last time. With 40,000 particles at batch 64
    (625 steps per epoch, a quarter epoch = 156.25 steps) that is at steps 100, ..., 1000, then every 200 steps, and
    every particle visited in the last epoch still has a usable stored mean."""
    from cryoem.vae import WHITEN_EARLY_STEPS, WHITENS_PER_EPOCH

    _, _, x0, bonds = toy_data(n=6)
    n, batch_size, every = 40_000, 64, 100
    model = AtomVAE(AtomVAEConfig(zdim=1, enc_width=8, dec_hidden=64, dec_layers=2, whiten_every=every), x0,
                    torch.ones(40), torch.full((40,), 2.0), bonds, BOX, APIX, n, 1.0)
    opt = torch.optim.Adam(model.parameters())
    whitened, order = [], torch.randperm(n)
    for step in range(1, 3 * n // batch_size + 1):
        idx = order[(step - 1) * batch_size % n:][:batch_size]
        mu = torch.randn(batch_size, 1)
        model._remember({"index": idx}, mu)
        model._accumulate(mu, torch.full((batch_size, 1, 1), 0.1))
        before = int(model.n_whiten)
        model.after_step(step, opt)
        if int(model.n_whiten) > before:
            whitened.append(step)
    assert WHITENS_PER_EPOCH == 4 and whitened[:10] == list(range(every, WHITEN_EARLY_STEPS + 1, every))
    assert whitened[10:] == [1200, 1400, 1600, 1800]  # 1100 is 100 steps (6,400 particles) after 1000: too soon
    assert bool(model.fresh().all())  # each particle was visited in the last epoch, at most 4 re-expressions ago


def test_posterior_mean_of_a_one_sided_decoder_matches_quadrature():
    """A decoder that moves the helix's top half by 3.6 z Å for z > 0 and by a tenth of that for z < 0 (a leaky ReLU of
    z), particles imaged near z = 0 in heavy noise: each posterior is one-sided, narrow above 0 and as wide as the prior
    below, so its mean lies well below its maximum. The importance-sampled mean must come close to the posterior mean
    that a quadrature over 2,001 latents gives, which the Laplace mode misses by 0.43 on average."""
    torch.manual_seed(0)
    batch, u, x0, bonds = toy_data(n=8, snr=1.0)
    model = make_model(x0, bonds, 1.0, particle_nuisance=False, dec_smooth=0.0, dec_rigid=(0,), search=0)
    d = model.decoder
    with torch.no_grad():
        for p in list(d.mlp.parameters()) + list(d.out.parameters()):
            p.zero_()
        d.mlp[0].weight[0, 0] = 1.0  # h0 = leaky(leaky(z)): z above 0, z / 100 below
        d.mlp[2].weight[0, 0] = 1.0
        d.out.weight.view(40, 3, -1)[20:, 0, 0] = 4.0 / d.scale
        model.init_scale(batch)
        clean = model.render(model.decode(torch.full((8, 1), 0.3)), batch["R"], batch["shift_A"], batch["ctf"])
        model.noise_sigma.fill_(4 * clean.std())
        batch["image"] = clean + 4 * clean.std() * torch.randn_like(clean)
        mode, precision, nu = model.laplace(batch, torch.full((8, 1), 0.3))
        mode, precision, _ = model.laplace(batch, mode)  # converged: a second step
        mean = model.importance_mean(batch, mode, precision, nu)
        grid = torch.linspace(-6, 6, 2001)[:, None]
        exact = []
        for i in range(8):
            one = {k: batch[k][i].expand(2001, *batch[k].shape[1:]) for k in ("image", "R", "shift_A", "ctf")}
            img = model.render(model.decode(grid), one["R"], one["shift_A"], one["ctf"])
            log_post = -model.reconstruction(one["image"], img, None) - 0.5 * grid[:, 0] ** 2
            exact.append(float((torch.softmax(log_post.double(), 0) * grid[:, 0]).sum()))
    exact = torch.tensor(exact)[:, None]
    off = (mode - exact).abs()
    assert off.mean() > 0.3, (mode, exact)  # the mode is not the mean here
    err = (mean - exact).abs()  # the Monte Carlo error of 32 draws: most within 0.1, on average a third of the mode's
    assert err.median() < 0.1 and err.mean() < off.mean() / 3, (mean, mode, exact)
