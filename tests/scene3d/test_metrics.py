"""Image metrics: PSNR, masked PSNR, SSIM."""

import math

import torch

from scene3d.metrics import foreground_mask, image_metrics, masked_psnr, psnr, ssim


def test_psnr_of_known_error():
    a = torch.zeros(2, 3, 8, 8)
    b = a + 0.1
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0))


def test_masked_psnr_only_counts_foreground():
    target = torch.zeros(1, 3, 8, 8)
    target[..., :4, :] = 0.5  # top half is the object on a black background
    pred = target.clone()
    pred[..., :4, :] += 0.1  # error on the object
    pred[..., 4:, :] += 0.3  # larger error on the background, ignored by the mask
    mask = foreground_mask(target, (0, 0, 0))
    assert mask.sum() == 32
    torch.testing.assert_close(masked_psnr(pred, target, mask), torch.tensor([20.0]))
    assert psnr(pred, target) < 20


def test_ssim_identity_and_ordering():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    small, large = x + 0.02 * torch.randn_like(x), x + 0.2 * torch.randn_like(x)
    assert (ssim(small, x) > ssim(large, x)).all()
    m = image_metrics(small, x, background=(0, 0, 0))
    assert set(m) == {"mse", "psnr", "ssim", "masked_psnr"} and all(v.shape == (2,) for v in m.values())
    assert not math.isnan(m["masked_psnr"][0])
