"""A plain reference NeRF on PyTorch3D's ``ImplicitRenderer``, for comparison with ``scene3d fit nerf``.

Everything that renders is PyTorch3D's own: ``MonteCarloRaysampler`` (random training rays),
``NDCMultinomialRaysampler`` (full test images), ``EmissionAbsorptionRaymarcher`` and ``HarmonicEmbedding``.
The MLP matches ``scene3d fit nerf``'s CPU defaults (4 x 128, a skip, 6 position / 2 direction
frequencies, points in box units), and so do the rays per step (1024) and the field evaluations
per ray (64: here stratified only; ours 32 coarse + 32 importance). Same data reader
(``scene3d.data.load_nerf_folder``), same cameras (``Camera.to_pytorch3d``), same metrics.

    python scripts/nerf_reference.py --data runs/nerf-scene --out runs/nerf-ref --eval-at 5 10 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from plato_core.runinfo import atomic_write, write_config
from renderers.cameras import Camera
from scene3d.ae_eval import save_strip
from scene3d.data import CAMERA_KEYS, load_nerf_folder
from scene3d.metrics import image_metrics


class PlainNeRF(nn.Module):
    """PyTorch3D implicit function: ray bundle -> (opacity per sample in [0, 1], colour)."""

    def __init__(self, width: int = 128, depth: int = 4, pos_freqs: int = 6, dir_freqs: int = 2, scale: float = 4.0):
        super().__init__()
        from pytorch3d.renderer import HarmonicEmbedding

        self.pos, self.dir, self.scale = HarmonicEmbedding(pos_freqs), HarmonicEmbedding(dir_freqs), scale
        d_in, d_dir = 3 * (2 * pos_freqs + 1), 3 * (2 * dir_freqs + 1)
        self.skip = depth // 2
        self.layers = nn.ModuleList(nn.Linear(d_in if i == 0 else width + (d_in if i == self.skip else 0), width)
                                    for i in range(depth))
        self.sigma = nn.Linear(width, 1)
        self.rgb = nn.Sequential(nn.Linear(width + d_dir, width // 2), nn.ReLU(), nn.Linear(width // 2, 3))

    def forward(self, ray_bundle, **kwargs):
        from pytorch3d.renderer import ray_bundle_to_ray_points

        pts = ray_bundle_to_ray_points(ray_bundle) / self.scale  # (..., P, 3) in box units
        x = self.pos(pts)  # HarmonicEmbedding appends the input itself
        h = x
        for i, layer in enumerate(self.layers):
            h = F.relu(layer(torch.cat([h, x], -1) if i == self.skip else h))
        sigma = F.softplus(self.sigma(h)) / self.scale  # 1 / world units
        d = F.normalize(ray_bundle.directions, dim=-1)
        d = self.dir(d)[..., None, :].expand(*h.shape[:-1], -1)
        rgb = torch.sigmoid(self.rgb(torch.cat([h, d], -1)))
        lengths = ray_bundle.lengths
        delta = torch.cat([lengths[..., 1:] - lengths[..., :-1], torch.full_like(lengths[..., :1], 1e10)], -1)
        delta = delta * ray_bundle.directions.norm(dim=-1, keepdim=True)
        return 1 - torch.exp(-sigma * delta[..., None]), rgb


def cameras(ds) -> Camera:
    item = ds[0]
    return Camera(*(item[k] for k in CAMERA_KEYS), ds.image_size)


def render_full(renderer, model, cams: Camera, background: float, chunk: int = 2) -> torch.Tensor:
    """(N, 3, H, W) test images."""
    out = []
    with torch.no_grad():
        for i in range(0, len(cams), chunk):
            (rgb_op, _) = renderer(cameras=cams[i:i + chunk].to_pytorch3d(), volumetric_function=model)
            rgb, op = rgb_op[..., :3], rgb_op[..., 3:]
            out.append((rgb + (1 - op) * background).permute(0, 3, 1, 2))
    return torch.cat(out).clamp(0, 1)


def main(argv=None) -> None:
    from pytorch3d.renderer import (
        EmissionAbsorptionRaymarcher,
        ImplicitRenderer,
        MonteCarloRaysampler,
        NDCMultinomialRaysampler,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--eval-at", type=float, nargs="+", default=[5, 10, 20])
    p.add_argument("--rays", type=int, default=1024)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--near", type=float, default=1.0)
    p.add_argument("--far", type=float, default=15.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=4, help="views per step")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, vars(a))
    train, test = load_nerf_folder(a.data, "train"), load_nerf_folder(a.data, "test")
    images = train[0]["images"]  # (V, 3, H, W)
    cams, test_cams = cameras(train), cameras(test)
    H, W = train.image_size
    bg = 1.0
    march = EmissionAbsorptionRaymarcher()
    mc = MonteCarloRaysampler(-1.0, 1.0, -1.0, 1.0, a.rays // a.batch_size, a.samples, a.near, a.far,
                              stratified_sampling=True)
    grid = NDCMultinomialRaysampler(image_width=W, image_height=H, n_pts_per_ray=a.samples, min_depth=a.near,
                                    max_depth=a.far)
    train_renderer, test_renderer = ImplicitRenderer(mc, march), ImplicitRenderer(grid, march)
    model = PlainNeRF()
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    results, steps, elapsed = [], 0, 0.0
    for budget in a.eval_at:
        t0 = time.time()
        while elapsed + (time.time() - t0) < 60 * budget:
            idx = torch.randint(len(cams), (a.batch_size,))
            (rgb_op, bundle) = train_renderer(cameras=cams[idx].to_pytorch3d(), volumetric_function=model)
            pred = rgb_op[..., :3] + (1 - rgb_op[..., 3:]) * bg  # (B, n, 3)
            # PyTorch3D NDC: +x left, +y up; grid_sample: +x right, +y down
            target = F.grid_sample(images[idx], -bundle.xys[:, :, None], align_corners=False)[..., 0].transpose(1, 2)
            loss = F.mse_loss(pred, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        elapsed += time.time() - t0
        pred = render_full(test_renderer, model, test_cams, bg)
        m = image_metrics(pred, test[0]["images"], (bg,) * 3)
        save_strip(pred[:6], test[0]["images"][:6], out / f"test_{budget:g}min.png")
        row = {"minutes": elapsed / 60, "steps": steps, "iterations_per_s": steps / elapsed,
               **{k: float(v.nanmean()) for k, v in m.items()}}
        results.append(row)
        print(json.dumps(row), flush=True)
        atomic_write(out / "metrics.json", json.dumps({"test": results, "test_views": test.views}, indent=2))
    torch.save(model.state_dict(), out / "model.pt")


if __name__ == "__main__":
    main()
