"""Image encoders shared by Plato's autoencoders: images (B, C, H, W) -> Gaussian q(z | x)."""

from __future__ import annotations

from torch import Tensor, nn


class ConvEncoder(nn.Module):
    """A strided ConvNet from images to the mean and log-variance of a diagonal Gaussian q(z | x).

    Each stage halves the resolution (3x3 conv, stride 2, then a 3x3 conv, ReLU) and the
    channels double from ``width`` up to ``8 * width``; a linear head maps the flattened
    features to ``(mu, logvar)``.

    Args:
        in_channels: C of the input images.
        image_size: H = W of the input (a power-of-two multiple of 4 works best; any size is accepted).
        latent_dim: size of z.
        width: channels of the first stage.
        stages: number of stride-2 stages (default: until the feature map is 4x4).
    """

    def __init__(self, in_channels: int, image_size: int, latent_dim: int, width: int = 32,
                 stages: int | None = None):
        super().__init__()
        if stages is None:
            stages = max(1, (image_size // 4).bit_length() - 1)
        layers, c, size = [], in_channels, image_size
        for i in range(stages):
            c_out = width * 2 ** min(i, 3)
            layers += [nn.Conv2d(c, c_out, 3, 2, 1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1), nn.ReLU()]
            c, size = c_out, (size + 1) // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(c * size * size, 2 * latent_dim)
        self.in_channels, self.image_size, self.latent_dim = in_channels, image_size, latent_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, H, W) -> mu, logvar: (B, latent_dim) each."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"x: expected shape (B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        mu, logvar = self.head(self.features(x)).chunk(2, dim=-1)
        return mu, logvar
