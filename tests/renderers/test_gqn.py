"""ConvDRAW (GQN generator): KL vanishes when posterior == prior, shapes, one step reduces the loss."""

import pytest
import torch

from renderers.gqn import ConvDRAW


def tiny(size=32, **kw):
    torch.manual_seed(0)
    args = dict(image_size=size, r_channels=8, hidden=8, z_channels=2, canvas_channels=8, steps=3, kernel=3)
    return ConvDRAW(**{**args, **kw})


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("r_grid", ["pool", "spatial"])
@pytest.mark.parametrize("share", [True, False])
def test_shapes(size, r_grid, share):
    gen = tiny(size, share_cores=share)
    g = 1 if r_grid == "pool" else size // 4
    x, v, r = torch.rand(2, 3, size, size), torch.randn(2, 7), torch.randn(2, 8, g, g)
    mean, kl = gen(x, v, r)
    assert mean.shape == (2, 3, size, size) and kl.shape == (2, 3)
    assert (kl >= -1e-5).all()
    img = gen.sample(v, r)
    assert img.shape == (2, 3, size, size) and (img >= 0).all() and (img <= 1).all()
    assert gen.sample(v, r, mean_latents=True).shape == (2, 3, size, size)
    assert len(gen.gen_cores) == (1 if share else 3)


def test_kl_is_zero_when_posterior_equals_prior():
    gen = tiny()
    x, v, r = torch.rand(2, 3, 32, 32), torch.randn(2, 7), torch.randn(2, 8, 1, 1)
    assert gen(x, v, r)[1].sum() > 0
    with torch.no_grad():  # both density heads emit the same N(b, exp(b')) whatever their input
        for head in (gen.prior, gen.posterior):
            head.weight.zero_()
        gen.posterior.bias.copy_(torch.randn(4))
        gen.prior.bias.copy_(gen.posterior.bias)
    kl = gen(x, v, r)[1]
    assert kl.abs().max() < 1e-6


def test_one_step_reduces_loss():
    gen = tiny()
    torch.manual_seed(1)
    x, v, r = torch.rand(4, 3, 32, 32), torch.randn(4, 7), torch.randn(4, 8, 8, 8)
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)

    def loss():
        torch.manual_seed(2)  # same latent noise before and after the step
        mean, kl = gen(x, v, r)
        return ((mean - x) ** 2).sum((1, 2, 3)).mean() / (2 * 0.7**2) + kl.sum(1).mean()

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert loss().item() < before.item()


def test_bad_inputs():
    gen = tiny()
    with pytest.raises(ValueError, match="v: expected"):
        gen.sample(torch.randn(2, 5), torch.randn(2, 8, 1, 1))
    with pytest.raises(ValueError, match="r: expected"):
        gen.sample(torch.randn(2, 7), torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match="x: expected"):
        gen(torch.rand(2, 3, 64, 64), torch.randn(2, 7), torch.randn(2, 8, 1, 1))
    with pytest.raises(ValueError, match="NaN"):
        gen.sample(torch.full((2, 7), float("nan")), torch.randn(2, 8, 1, 1))
    with pytest.raises(ValueError, match="multiple"):
        ConvDRAW(image_size=30)
