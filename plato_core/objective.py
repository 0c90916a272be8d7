"""The VAE objective, shared by every autoencoder in Plato (scenes and cryo-EM).

ELBO = E_q[log p(x | z)] - beta * KL(q(z | x) || p(z)). All terms are in nats and
summed over the event dimensions, so they are per item; divide by the number of
pixels x channels x ln 2 for bits/dim (:func:`bits_per_dim`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """A sample of N(mu, exp(logvar)) that gradients flow through: mu + sigma * eps."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor | None = None, logvar_p: Tensor | None = None,
                dims: int | None = None) -> Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) for diagonal Gaussians, in nats.

    ``mu_p`` / ``logvar_p`` default to the standard normal. The KL is summed over the
    last ``dims`` dimensions (default: all but the first), so the result is (B,).
    """
    mu_p = torch.zeros_like(mu_q) if mu_p is None else mu_p
    logvar_p = torch.zeros_like(logvar_q) if logvar_p is None else logvar_p
    kl = 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1)
    return _sum_last(kl, dims)


def gaussian_log_likelihood(x: Tensor, mean: Tensor, sigma: float | Tensor, dims: int | None = None) -> Tensor:
    """log N(x; mean, sigma^2), summed over the last ``dims`` dimensions (default: all but the first), in nats."""
    sigma = torch.as_tensor(sigma, dtype=mean.dtype, device=mean.device)
    ll = -0.5 * ((x - mean) / sigma) ** 2 - torch.log(sigma) - 0.5 * LOG_2PI
    return _sum_last(ll, dims)


def active_units(mu: Tensor, threshold: float = 0.01) -> Tensor:
    """Number of active latent units (Burda et al. 2016): dimensions whose posterior mean varies across
    the data, ``Var_x(E_q[z_d | x]) > threshold``. ``mu`` is (B, zdim) posterior means; returns a scalar
    int64 tensor. A dimension whose mean does not move with the input carries no information about it.
    """
    if len(mu) < 2:
        return torch.zeros((), dtype=torch.long, device=mu.device)
    return (mu.detach().var(dim=0) > threshold).sum()


def bits_per_dim(nats: Tensor, num_dims: int) -> Tensor:
    """Convert a per-item negative log-likelihood in nats to bits per dimension."""
    return nats / (num_dims * math.log(2))


def _sum_last(x: Tensor, dims: int | None) -> Tensor:
    dims = x.dim() - 1 if dims is None else dims
    return x.sum(dim=tuple(range(x.dim() - dims, x.dim()))) if dims > 0 else x
