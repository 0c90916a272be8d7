"""The GQN generator: ConvDRAW, a neural renderer queried at a viewpoint (Eslami et al., Science 2018).

Given a scene representation ``r`` and a query viewpoint ``v``, ConvDRAW draws an image in
``L`` steps. At every step ``l`` (supplement, "Generation architecture"):

* the prior ``pi(z_l | h^g_{l-1})`` is a Gaussian from a conv on the generator state;
* training: the inference (posterior) ConvLSTM reads ``(x_q, v, r, h^g_{l-1})`` and gives
  ``q(z_l | ...)``; ``z_l ~ q``. Test time: ``z_l ~ pi``;
* the generator ConvLSTM reads ``(v, r, z_l)``; its hidden state ``h^g_l`` is upsampled by a
  learned transposed convolution and added to the canvas ``u``;
* after ``L`` steps a 1x1 conv maps ``u`` to the image mean (linear, as in the paper; no
  sigmoid, whose saturation towards a black background stalls training). Test-time images
  are clamped to [0, 1].

Shapes: images ``(B, C, H, W)`` with H = W divisible by ``scale``; the recurrent state lives
at ``(H / scale, W / scale)``; ``v`` is ``(B, v_dim)`` (7 for GQN: ``x, y, z`` and the sines and
cosines of yaw and pitch, see ``Camera.to_gqn``); ``r`` is ``(B, r_channels, h, w)`` at the
state resolution or ``(B, r_channels, 1, 1)`` (broadcast). The KL per step is summed over the
latent's channels and pixels, in nats: ``(B, L)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from renderers._validate import check_tensor


class ConvLSTMCell(nn.Module):
    """A convolutional LSTM cell: all four gates from one conv over ``cat(input, h)``."""

    def __init__(self, in_channels: int, hidden: int, kernel: int = 5):
        super().__init__()
        self.hidden = hidden
        self.conv = nn.Conv2d(in_channels + hidden, 4 * hidden, kernel, padding=kernel // 2)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """x: (B, in, h, w); state: (h, c) each (B, hidden, h, w) -> new (h, c)."""
        h, c = state
        f, i, o, g = self.conv(torch.cat([x, h], 1)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class ConvDRAW(nn.Module):
    """ConvDRAW generator p(x | v, r) with L latent steps.

    Args:
        image_channels: C of the images.
        image_size: H = W of the images (divisible by ``scale``).
        r_channels: channels of the representation r.
        v_dim: size of the viewpoint vector (7 for GQN).
        hidden: ConvLSTM channels (paper: 256).
        z_channels: latent channels per step (paper: 3).
        canvas_channels: channels of the full-resolution canvas u (paper: 256).
        steps: L, the number of generation steps (paper: 12).
        scale: resolution ratio between image and recurrent state (paper: 4).
        kernel: ConvLSTM and density kernel size (paper: 5).
        share_cores: one generator / inference core for all L steps (paper) or one per step.
    """

    def __init__(self, image_channels: int = 3, image_size: int = 64, r_channels: int = 256, v_dim: int = 7,
                 hidden: int = 128, z_channels: int = 3, canvas_channels: int = 64, steps: int = 12,
                 scale: int = 4, kernel: int = 5, share_cores: bool = True):
        super().__init__()
        if image_size % scale:
            raise ValueError(f"image_size: expected a multiple of scale={scale}, got {image_size}")
        self.C, self.size, self.scale, self.L = image_channels, image_size, scale, steps
        self.r_channels, self.v_dim, self.z_channels, self.hidden = r_channels, v_dim, z_channels, hidden
        n = 1 if share_cores else steps
        self.gen_cores = nn.ModuleList(ConvLSTMCell(v_dim + r_channels + z_channels, hidden, kernel)
                                       for _ in range(n))
        self.inf_cores = nn.ModuleList(ConvLSTMCell(hidden + v_dim + r_channels + hidden, hidden, kernel)
                                       for _ in range(n))
        self.prior = nn.Conv2d(hidden, 2 * z_channels, kernel, padding=kernel // 2)
        self.posterior = nn.Conv2d(hidden, 2 * z_channels, kernel, padding=kernel // 2)
        self.read_x = nn.Conv2d(image_channels, hidden, scale, stride=scale)  # x_q down to the state grid
        self.write = nn.ConvTranspose2d(hidden, canvas_channels, scale, stride=scale)  # learned upsampling
        self.to_image = nn.Conv2d(canvas_channels, image_channels, 1)
        self.canvas_channels = canvas_channels

    # ----------------------------------------------------------------- checks
    def _prepare(self, v: Tensor, r: Tensor, x: Tensor | None) -> tuple[Tensor, Tensor]:
        """Validate inputs; return v and r broadcast to the state grid (B, *, h, w)."""
        g = self.size // self.scale
        B = check_tensor("v", v, ("B", self.v_dim))["B"]
        check_tensor("r", r, [("B", self.r_channels, g, g), ("B", self.r_channels, 1, 1)], {"B": B})
        if x is not None:
            check_tensor("x", x, ("B", self.C, self.size, self.size), {"B": B})
        return v[:, :, None, None].expand(B, self.v_dim, g, g), r.expand(B, self.r_channels, g, g)

    def _init_state(self, B: int, ref: Tensor):
        g = self.size // self.scale
        z = lambda c: ref.new_zeros(B, c, g, g)
        return (z(self.hidden), z(self.hidden)), ref.new_zeros(B, self.canvas_channels, self.size, self.size)

    def _core(self, cores: nn.ModuleList, step: int) -> ConvLSTMCell:
        return cores[0] if len(cores) == 1 else cores[step]

    @staticmethod
    def _gaussian(params: Tensor) -> Normal:
        mu, logvar = params.chunk(2, 1)
        return Normal(mu, torch.exp(0.5 * logvar.clamp(-10, 10)))

    # ---------------------------------------------------------------- passes
    def forward(self, x: Tensor, v: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """Training pass with the posterior.

        Args:
            x: (B, C, H, W) query images in [0, 1]; v: (B, v_dim); r: (B, r_channels, h|1, w|1).
        Returns:
            mean: (B, C, H, W) image mean (unclamped).
            kl: (B, L) KL(q(z_l) || pi(z_l)) per step, nats summed over latent channels and pixels.
        """
        v, r = self._prepare(v, r, x)
        B = x.shape[0]
        (hg, cg), u = self._init_state(B, x)
        he, ce = hg, cg
        xd = self.read_x(x)
        kls = []
        for step in range(self.L):
            prior = self._gaussian(self.prior(hg))
            he, ce = self._core(self.inf_cores, step)(torch.cat([xd, v, r, hg], 1), (he, ce))
            post = self._gaussian(self.posterior(he))
            z = post.rsample()
            hg, cg = self._core(self.gen_cores, step)(torch.cat([v, r, z], 1), (hg, cg))
            u = u + self.write(hg)
            kls.append(kl_divergence(post, prior).sum((1, 2, 3)))
        return self.to_image(u), torch.stack(kls, 1)

    @torch.no_grad()
    def sample(self, v: Tensor, r: Tensor, mean_latents: bool = False) -> Tensor:
        """Test-time image means with z_l drawn from the prior (or its mean): (B, C, H, W) in [0, 1]."""
        v, r = self._prepare(v, r, None)
        (hg, cg), u = self._init_state(v.shape[0], v)
        for step in range(self.L):
            prior = self._gaussian(self.prior(hg))
            z = prior.mean if mean_latents else prior.sample()
            hg, cg = self._core(self.gen_cores, step)(torch.cat([v, r, z], 1), (hg, cg))
            u = u + self.write(hg)
        return self.to_image(u).clamp(0, 1)
