"""Image metrics shared by Plato's scene autoencoders (GQN, voxel, mesh, NeRF).

Images are (B, C, H, W) floats in [0, 1]; every function returns one value per image, (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred - target) ** 2).flatten(1).mean(1)


def psnr(pred: Tensor, target: Tensor, eps: float = 1e-10) -> Tensor:
    """Peak signal-to-noise ratio in dB for a peak of 1."""
    return -10 * torch.log10(mse(pred, target) + eps)


def foreground_mask(target: Tensor, background, tol: float = 4 / 255) -> Tensor:
    """(B, 1, H, W) bool: pixels whose colour differs from ``background`` (C floats) by more than ``tol``."""
    bg = torch.as_tensor(background, dtype=target.dtype, device=target.device).view(1, -1, 1, 1)
    return ((target - bg).abs().amax(1, keepdim=True) > tol)


def masked_psnr(pred: Tensor, target: Tensor, mask: Tensor, eps: float = 1e-10) -> Tensor:
    """PSNR (dB) over the pixels where ``mask`` (B, 1, H, W) is true; NaN for an empty mask."""
    m = mask.to(pred.dtype).expand_as(pred)
    err = (((pred - target) ** 2) * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    return -10 * torch.log10(err + eps)


def _gaussian_window(size: int, sigma: float, dtype, device) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: Tensor, target: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004): Gaussian window 11 / sigma 1.5, K1 = 0.01, K2 = 0.03,
    valid convolution, averaged over channels and positions."""
    C = pred.shape[1]
    window = min(window, pred.shape[-1], pred.shape[-2])
    w = _gaussian_window(window, sigma, pred.dtype, pred.device).expand(C, 1, window, window)
    f = lambda x: F.conv2d(x, w, groups=C)
    mu_x, mu_y = f(pred), f(target)
    sxx = f(pred * pred) - mu_x ** 2
    syy = f(target * target) - mu_y ** 2
    sxy = f(pred * target) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def image_metrics(pred: Tensor, target: Tensor, background=None, tol: float = 4 / 255) -> dict[str, Tensor]:
    """MSE, PSNR, foreground-masked PSNR (if ``background`` is known; foreground: more than ``tol`` from it) and
    SSIM, each (B,)."""
    out = {"mse": mse(pred, target), "psnr": psnr(pred, target), "ssim": ssim(pred, target)}
    if background is not None:
        out["masked_psnr"] = masked_psnr(pred, target, foreground_mask(target, background, tol))
    return out



def format_table(rows: list[dict], columns: dict[str, str]) -> str:
    """Rows of results as an aligned text table. ``columns`` maps each row key to its header, in order;
    numbers print with 4 decimals, a missing value as ``-``."""
    def cell(v) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(k)) for k in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(columns.values())]
    text = [[h for h in columns.values()], *cells]
    return "\n".join(" ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in text)
