"""The shared VAE objective pieces and image encoder."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from plato_core.encoders import ConvEncoder
from plato_core.objective import bits_per_dim, gaussian_kl, gaussian_log_likelihood, reparameterize


def test_kl_and_log_likelihood_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mq, lq, mp, lp = (torch.randn(3, 5, 2, generator=g) for _ in range(4))
    ref = kl_divergence(Normal(mq, (0.5 * lq).exp()), Normal(mp, (0.5 * lp).exp())).sum((1, 2))
    torch.testing.assert_close(gaussian_kl(mq, lq, mp, lp), ref)
    ref0 = kl_divergence(Normal(mq, (0.5 * lq).exp()), Normal(0.0, 1.0)).sum((1, 2))
    torch.testing.assert_close(gaussian_kl(mq, lq), ref0)
    assert gaussian_kl(mq, lq, mq, lq).abs().max() < 1e-6
    x = torch.randn(3, 5, 2, generator=g)
    torch.testing.assert_close(gaussian_log_likelihood(x, mq, 0.7), Normal(mq, 0.7).log_prob(x).sum((1, 2)))
    assert gaussian_log_likelihood(x, mq, 0.7, dims=1).shape == (3, 5)
    assert torch.isclose(bits_per_dim(torch.tensor(10 * 0.6931471805599453), 10), torch.tensor(1.0))


def test_reparameterize_statistics():
    torch.manual_seed(0)
    z = reparameterize(torch.full((20000,), 2.0), torch.full((20000,), 2 * torch.log(torch.tensor(3.0))))
    assert abs(z.mean() - 2) < 0.1 and abs(z.std() - 3) < 0.1


@pytest.mark.parametrize("size", [32, 64])
def test_conv_encoder_shapes(size):
    enc = ConvEncoder(3, size, 8)
    mu, logvar = enc(torch.rand(2, 3, size, size))
    assert mu.shape == logvar.shape == (2, 8)
    with pytest.raises(ValueError, match="expected shape"):
        enc(torch.rand(2, 1, size, size))
