"""Generative Query Network (Eslami et al., Science 2018): representation networks + ConvDRAW.

A scene's representation is the sum of ``f(x_k, v_k)`` over its K context views; the
ConvDRAW generator (``renderers.gqn``) renders it at a query viewpoint. Viewpoints are
GQN 7-vectors from our cameras (``Camera.to_gqn(order="deepmind")``, z-up world).

Training (``GQN.loss``) draws, per batch, K ~ U{1..max_contexts} context views and one
distinct query view per scene, and minimises the negative ELBO per pixel

    -ELBO = -log N(x_q; mean, sigma_t^2) + sum_l KL(q(z_l) || pi(z_l))

with the pixel sigma annealed linearly from ``sigma_start`` = 2.0 to ``sigma_end`` = 0.7
over ``sigma_anneal_steps`` (the paper: 2e5 steps), or by default over the first ``SIGMA_SHARE`` of the
training budget, however many steps the machine makes of it (:meth:`GQN.set_progress`).

CPU defaults (the paper's values in brackets): 32² images [64²], L = 4 steps [12],
ConvLSTM hidden 32 [256], canvas 16 channels [256], z 2 channels [3], 3x3 kernels [5x5],
r 32 channels [256], tower representation at H/4, shared cores; with the trainer's
Adam at lr 1e-3 -> 1e-4 over the whole budget [5e-4 -> 5e-5 over 1.6e6], batch 16 [36].
About 4 steps/s on one busy CPU core.

``representation="epipolar"`` (not in the paper; after E-GQN, Tobin et al. 2019) replaces the
view-summed r by one rendered for the query: context features gathered along each query ray
(:class:`Epipolar`). It learns far faster than the tower: on 7-cube Shepard-Metzler at 32², 30 CPU
minutes gave a masked PSNR of 17.3 dB at 5 contexts against 13.9 dB for the tower. At 64² one ray per
4x4 pixels (``ray_cell``, the generator's grid) runs at ~3.2 steps/s on one core, 3x the 2x2 rays' rate,
and gave 16.9 dB at 5 contexts after 30 minutes against 15.2 dB (2026-12-08). Its r lives in the query's image grid, so
linear probes of world-frame factors read it less well than the tower's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plato_core.objective import bits_per_dim, gaussian_log_likelihood
from plato_core.runinfo import UserError
from plato_core.settings import setting
from renderers.cameras import Camera
from renderers.gqn import ConvDRAW
from scene3d.data import CAMERA_KEYS, batch_cameras
from scene3d.views import sample_views

SIGMA_SHARE = 0.55  # default: sigma reaches sigma_end after this share of the budget. Measured 2026-12-08 (64², 30
# minutes, ~1,800 steps): annealed over the first 1,000 steps with the lr over all of them, masked PSNR at 5 contexts
# 15.14 dB; over 2,000 steps (never finished) with the lr over 4,500, 14.73 dB; with these defaults, 15.21 dB.


@dataclass
class GQNConfig:
    """Hyper-parameters of a GQN (written to config.json and checkpoints; fields with a flag are ``scene3d train
    gqn`` options). CPU defaults; the paper's values (Eslami et al. 2018) in brackets."""

    image_size: int = setting(32, "image side in pixels [64]")
    channels: int = setting(3, "image channels", cli=False)
    representation: str = setting("tower", "pool | tower | pyramid; epipolar: features gathered along each query "
                                           "ray (E-GQN-style, query-dependent r)",
                                  choices=("pool", "tower", "pyramid", "epipolar"))
    r_channels: int = setting(32, "channels of the representation r [256]")
    hidden: int = setting(32, "ConvLSTM channels [256]")
    z_channels: int = setting(2, "latent channels per ConvDRAW step [3]")
    canvas_channels: int = setting(16, "canvas channels [256]")
    gen_steps: int = setting(4, "ConvDRAW steps L [12]")
    kernel: int = setting(3, "ConvLSTM kernel [5]")
    share_cores: bool = setting(True, "one ConvLSTM core shared by all ConvDRAW steps (--no-share-cores: one each)")
    sigma_start: float = setting(2.0, "pixel std at the start of annealing [2.0]")
    sigma_end: float = setting(0.7, "pixel std after annealing [0.7]")
    sigma_anneal_steps: int | None = setting(None, "steps of the pixel-std annealing [2e5] (default: the first "
                                                   "55% of the training budget, see SIGMA_SHARE)")
    max_contexts: int = setting(5, "most context views per scene")
    v_dim: int = setting(7, "viewpoint vector length", cli=False)
    position_scale: float = setting(1.0, "camera positions are multiplied by this (training sets 1 / mean camera "
                                         "distance)", cli=False)
    depth_samples: int = setting(16, "epipolar: points per query ray")
    epipolar_features: int = setting(16, "epipolar: ConvNet features per context pixel read at each ray point (the "
                                         "image's own channels are read too)")
    scene_radius: float = setting(4.0, "epipolar: rays are sampled within this distance (world units) of the origin",
                                  cli=False)
    ray_cell: int = setting(4, "epipolar: one query ray per cell of this many pixels squared: 4 (the "
                               "generator's own grid) or 2 (4x the ray points, ~3x slower per step)", choices=(2, 4))


# ------------------------------------------------------------ representations
class Tower(nn.Module):
    """The 'tower' network: (x (B, C, H, W), v (B, 7)) -> r (B, c, H/4, W/4), with residual skips."""

    def __init__(self, channels: int = 3, c: int = 256, v_dim: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, c, 2, stride=2)
        self.conv2 = nn.Conv2d(c, c, 2, stride=2)
        self.conv3 = nn.Conv2d(c, c // 2, 3, padding=1)
        self.conv4 = nn.Conv2d(c // 2, c, 2, stride=2)
        self.conv5 = nn.Conv2d(c + v_dim, c, 3, padding=1)
        self.conv6 = nn.Conv2d(c + v_dim, c // 2, 3, padding=1)
        self.conv7 = nn.Conv2d(c // 2, c, 3, padding=1)
        self.conv8 = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor, v: Tensor) -> Tensor:
        a = F.relu(self.conv1(x))
        r = F.relu(self.conv4(F.relu(self.conv3(a)))) + F.relu(self.conv2(a))
        a = torch.cat([r, v[:, :, None, None].expand(-1, -1, *r.shape[-2:])], 1)
        r = F.relu(self.conv7(F.relu(self.conv6(a)))) + F.relu(self.conv5(a))
        return F.relu(self.conv8(r))


class Pool(Tower):
    """The 'pool' network: the tower followed by global average pooling -> (B, c, 1, 1)."""

    def forward(self, x: Tensor, v: Tensor) -> Tensor:
        return super().forward(x, v).mean((2, 3), keepdim=True)


class Pyramid(nn.Module):
    """The 'pyramid' network: v broadcast onto the image, stride-2 convs, then one conv to 1x1 -> (B, c, 1, 1)."""

    def __init__(self, channels: int = 3, c: int = 256, v_dim: int = 7, image_size: int = 64):
        super().__init__()
        layers, cin, size, width = [], channels + v_dim, image_size, c // 8
        while size > 4:
            layers += [nn.Conv2d(cin, width, 2, stride=2), nn.ReLU()]
            cin, size, width = width, size // 2, min(2 * width, c)
        layers += [nn.Conv2d(cin, c, size), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, v: Tensor) -> Tensor:
        return self.net(torch.cat([x, v[:, :, None, None].expand(-1, -1, *x.shape[-2:])], 1))


class Epipolar(nn.Module):
    """Query-dependent representation from features along each query ray (after E-GQN, Tobin et al. 2019).

    Each context view gets a full-resolution ConvNet feature map (plus its RGB). A query ray is
    cast through each cell of an (H/cell)² grid and ``depth_samples`` points are placed on it where it
    crosses the sphere of radius ``scene_radius``. Every point is projected into every context view
    and reads the features there; the mean and variance over the views that see it (their
    photo-consistency) go through an MLP that gives a score and a value. The softmax of the scores
    along the ray weights the values. With the mean context feature, convolutions (stride 2 for
    cells of 2 px) map the rays to r (B, c, H/4, W/4) in the query's image grid.
    """

    def __init__(self, channels: int = 3, c: int = 32, image_size: int = 32, depth_samples: int = 16,
                 scene_radius: float = 4.0, feat: int = 16, hidden: int = 64, cell: int = 2):
        super().__init__()
        if cell not in (2, 4):
            raise UserError(f"--ray-cell {cell}: expected 2 or 4")
        self.size, self.D, self.radius, self.cell = image_size, depth_samples, scene_radius, cell
        self.enc = nn.Sequential(nn.Conv2d(channels, feat, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(feat, feat, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(feat, feat, 3, padding=1))
        f = feat + channels
        self.point = nn.Sequential(nn.Linear(2 * f + 2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                   nn.Linear(hidden, 1 + f))
        self.out = nn.Sequential(nn.Conv2d(2 * f + 1, c, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(c, c, 2, stride=2) if cell == 2 else nn.Conv2d(c, c, 1))

    def _cameras(self, v: Tensor) -> Camera:
        """Cameras from the last 16 entries (R, t, focal, principal) of extended viewpoints (N, 7 + 16)."""
        w = v[:, -16:]
        return Camera(w[:, :9].reshape(-1, 3, 3), w[:, 9:12], w[:, 12:14], w[:, 14:16], (self.size, self.size))

    def _ray_points(self, q: Camera) -> tuple[Tensor, Tensor]:
        """Points (B, h*w*D, 3) on the query rays of an (H/cell)² grid, and their depth fraction (B, h*w*D)."""
        h = self.size // self.cell
        s = (torch.arange(h, dtype=q.dtype, device=q.device) + 0.5) * self.cell  # centres of the cells
        yy, xx = torch.meshgrid(s, s, indexing="ij")
        uv = torch.stack([xx, yy], -1).reshape(1, -1, 2).expand(len(q), -1, 2)
        o, d = q.rays(uv)  # (B, h*h, 3)
        tc = -(o * d).sum(-1, keepdim=True)  # closest approach to the origin
        half = (self.radius ** 2 - (o + tc * d).pow(2).sum(-1, keepdim=True)).clamp_min(1e-4).sqrt()
        near = (tc - half).clamp_min(1e-2)
        frac = (torch.arange(self.D, dtype=q.dtype, device=q.device) + 0.5) / self.D
        depth = near + (tc + half - near) * frac  # (B, h*h, D)
        pts = o[:, :, None] + depth[..., None] * d[:, :, None]
        return pts.reshape(len(q), -1, 3), frac.expand_as(depth).reshape(len(q), -1)

    def gather(self, x: Tensor, v: Tensor, q_v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Context features at the query rays' points (:func:`scene3d.views.sample_views`), channel-first.

        Args:
            x: contexts (B, K, C, H, W); v: their extended viewpoints (B, K, 23); q_v: the query's (B, 23).
        Returns:
            feats (B*K, F, H, W) context feature maps (ConvNet features, then the C image channels);
            f (B, K, F, N) features at the N = (H/cell)² * D ray points, zero where a view does not see the point;
            seen (B, K, 1, N) 1 where the point projects into the view in front of its camera;
            frac (B, N) the point's position along its ray segment, in (0, 1).
        """
        B, K, C, H, W = x.shape
        feats = torch.cat([self.enc(x.flatten(0, 1)), x.flatten(0, 1)], 1)
        pts, frac = self._ray_points(self._cameras(q_v))
        N = pts.shape[1]
        f, seen = sample_views([feats], self._cameras(v.flatten(0, 1)), pts.repeat_interleave(K, 0))
        return feats, f.view(B, K, -1, N), seen.view(B, K, 1, N), frac

    def _point_mlp(self, x: Tensor) -> Tensor:
        """``self.point`` applied channel-first: (B, 2F + 2, N) -> (B, 1 + F, N), without transposing N."""
        layers = [m for m in self.point if isinstance(m, nn.Linear)]
        for i, layer in enumerate(layers):
            x = torch.baddbmm(layer.bias[:, None], layer.weight.expand(len(x), -1, -1), x)
            if i < len(layers) - 1:
                x = torch.relu(x)
        return x

    def forward(self, x: Tensor, v: Tensor, q_v: Tensor) -> Tensor:
        """Contexts x (B, K, C, H, W), extended viewpoints v (B, K, 23), query q_v (B, 23) -> (B, c, H/4, W/4)."""
        B, K, C, H, W = x.shape
        feats, f, seen, frac = self.gather(x, v, q_v)
        n = seen.sum(1).clamp_min(1.0)  # (B, 1, N)
        mean = f.sum(1) / n
        var = ((f * f).sum(1) / n - mean * mean).clamp_min(0.0)  # over the views that see the point
        out = self._point_mlp(torch.cat([mean, var, seen.mean(1), frac[:, None]], 1))  # (B, 1 + F, N)
        h = H // self.cell
        out = out.view(B, -1, h * h, self.D)
        w = torch.softmax(out[:, :1], -1)  # (B, 1, h*h, D) along each ray
        ray = (w * out[:, 1:]).sum(-1)  # (B, F, h*h)
        expected_depth = (w * frac.view(B, 1, h * h, self.D)).sum(-1)
        glob = feats.view(B, K, -1, H * W).mean((1, 3))[..., None].expand_as(ray)
        return self.out(torch.cat([ray, glob, expected_depth], 1).view(B, -1, h, h))


def representation_net(cfg: GQNConfig) -> nn.Module:
    if cfg.representation == "epipolar":
        return Epipolar(cfg.channels, cfg.r_channels, cfg.image_size, cfg.depth_samples, cfg.scene_radius,
                        feat=cfg.epipolar_features, cell=cfg.ray_cell)
    if cfg.representation == "tower":
        return Tower(cfg.channels, cfg.r_channels, cfg.v_dim)
    if cfg.representation == "pool":
        return Pool(cfg.channels, cfg.r_channels, cfg.v_dim)
    if cfg.representation == "pyramid":
        return Pyramid(cfg.channels, cfg.r_channels, cfg.v_dim, cfg.image_size)
    raise UserError(f"--representation: expected pool, tower, pyramid or epipolar, got {cfg.representation!r}")


# ----------------------------------------------------------------------- GQN
def data_scales(data) -> dict[str, float]:
    """``position_scale`` and ``scene_radius`` for a multi-view dataset (``scene3d.data.MultiViewDataset``):
    1 / the mean camera distance from the origin, and the occupancy bounds' half-size (world units) when the
    data record them, else the mean camera distance."""
    import numpy as np

    centres = -np.einsum("nvji,nvj->nvi", data.R, data.t)  # camera centres -R^T t
    dist = float(np.linalg.norm(centres, axis=-1).mean())
    bounds = data.meta.get("occupancy", {}).get("bounds")
    return {"position_scale": 1 / max(dist, 1e-6), "scene_radius": float(np.abs(bounds).max()) if bounds else dist}


def viewpoints(batch: dict, position_scale: float = 1.0) -> Tensor:
    """(B, V, 7) GQN viewpoint vectors of a collated multi-view batch, positions times ``position_scale``."""
    B, V = batch["R"].shape[:2]
    H, W = batch["images"].shape[-2:]
    cams = batch_cameras(batch, (H, W))
    v = cams.to_gqn(order="deepmind").reshape(B, V, 7).to(batch["images"].dtype)
    return torch.cat([v[..., :3] * position_scale, v[..., 3:]], -1)


def extended_viewpoints(batch: dict, position_scale: float = 1.0) -> Tensor:
    """(B, V, 23): the GQN viewpoint (7) followed by the camera's R (9), t (3), focal (2) and principal (2)."""
    B, V = batch["R"].shape[:2]
    cam = [batch[k].reshape(B, V, -1) for k in CAMERA_KEYS]
    return torch.cat([viewpoints(batch, position_scale), *(c.to(batch["images"].dtype) for c in cam)], -1)


def gather_views(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, V, ...) and idx (B, K) -> (B, K, ...)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


class GQN(nn.Module):
    """Representation network + ConvDRAW generator, trained by :class:`plato_core.trainer.Trainer`."""

    kind = "gqn"  # run kind (config.json)

    def __init__(self, cfg: GQNConfig):
        super().__init__()
        self.cfg = cfg
        self.progress = 0.0  # share of the training budget spent (set_progress)
        if cfg.image_size % 4:
            raise UserError(f"image size {cfg.image_size}: GQN needs a multiple of 4")
        self.rep = representation_net(cfg)
        self.gen = ConvDRAW(cfg.channels, cfg.image_size, cfg.r_channels, cfg.v_dim, cfg.hidden, cfg.z_channels,
                            cfg.canvas_channels, cfg.gen_steps, 4, cfg.kernel, cfg.share_cores)

    def set_progress(self, progress: float) -> None:
        """The fraction of the training budget spent (the trainer calls this before each step)."""
        self.progress = float(progress)

    def sigma(self, step: int) -> float:
        """Pixel standard deviation at ``step``: linear from sigma_start to sigma_end, then flat; over
        ``sigma_anneal_steps`` steps, or (None) over the first ``SIGMA_SHARE`` of the budget."""
        c = self.cfg
        if c.sigma_anneal_steps is None:
            frac = min(self.progress / SIGMA_SHARE, 1.0)
        else:
            frac = min(step / max(c.sigma_anneal_steps, 1), 1.0)
        return c.sigma_end + (c.sigma_start - c.sigma_end) * (1 - frac)

    def represent(self, images: Tensor, v: Tensor, q_v: Tensor | None = None) -> Tensor:
        """Context images (B, K, C, H, W) and viewpoints (B, K, 7 | 23) -> r (B, r_channels, h, w).

        Pool, tower and pyramid sum ``f(x_k, v_k)`` over the K views; ``epipolar`` also needs the
        query's extended viewpoint ``q_v`` (B, 23) and renders r in the query's image grid.
        """
        B, K = images.shape[:2]
        if self.cfg.representation == "epipolar":
            if q_v is None or v.shape[-1] != self.cfg.v_dim + 16:
                raise ValueError("the epipolar representation needs extended viewpoints (B, K, 23) and q_v (B, 23)")
            return self.rep(images, v, q_v)
        r = self.rep(images.flatten(0, 1), v[..., :self.cfg.v_dim].flatten(0, 1))
        return r.view(B, K, *r.shape[1:]).sum(1)

    def check_batch(self, batch: dict) -> None:
        x = batch["images"]
        c = self.cfg
        if x.dim() != 5 or x.shape[2:] != (c.channels, c.image_size, c.image_size):
            raise UserError(f"data images are {tuple(x.shape[2:])} (C, H, W) but the model expects "
                            f"({c.channels}, {c.image_size}, {c.image_size})")
        if x.shape[1] < 2:
            raise UserError(f"data scenes have {x.shape[1]} view(s); GQN needs at least 2 (contexts + query)")

    def split(self, batch: dict, k: int, generator: torch.Generator | None = None):
        """Random k context views and one distinct query view per scene.

        Returns ctx_x (B, k, C, H, W), ctx_v (B, k, 23), q_x (B, C, H, W), q_v (B, 23), ctx_idx, q_idx;
        viewpoints are ``extended_viewpoints`` (the generator reads their first 7 entries).
        """
        x, v = batch["images"], extended_viewpoints(batch, self.cfg.position_scale)
        B, V = x.shape[:2]
        perm = torch.rand(B, V, generator=generator).argsort(1).to(x.device)
        ctx, q = perm[:, :k], perm[:, k]
        return gather_views(x, ctx), gather_views(v, ctx), gather_views(x, q[:, None])[:, 0], \
            gather_views(v, q[:, None])[:, 0], ctx, q

    def loss(self, batch: dict, step: int) -> dict[str, Tensor]:
        V = batch["images"].shape[1]
        k = int(torch.randint(1, min(self.cfg.max_contexts, V - 1) + 1, ()).item())
        ctx_x, ctx_v, q_x, q_v, _, _ = self.split(batch, k)
        sigma = self.sigma(step)
        terms = self.elbo_terms(ctx_x, ctx_v, q_x, q_v, sigma)
        dims = q_x[0].numel()
        loss = (terms["nll"] + terms["kl"]).mean() / dims
        return {"loss": loss, "bits_per_dim": bits_per_dim((terms["nll"] + terms["kl"]).mean(), dims).detach(),
                "kl": terms["kl"].mean().detach(), "mse": terms["mse"].mean().detach(),
                "sigma": torch.tensor(sigma), "contexts": torch.tensor(float(k))}

    def elbo_terms(self, ctx_x, ctx_v, q_x, q_v, sigma: float) -> dict[str, Tensor]:
        """Per scene (B,): ``nll`` = -log N(x_q; mean, sigma^2) and ``kl`` summed over steps, in nats; ``mse``."""
        r = self.represent(ctx_x, ctx_v, q_v)
        mean, kl = self.gen(q_x, q_v[:, :self.cfg.v_dim], r)
        nll = -gaussian_log_likelihood(q_x, mean, sigma)
        return {"nll": nll, "kl": kl.sum(1), "mse": ((mean - q_x) ** 2).flatten(1).mean(1), "mean": mean}

    @torch.no_grad()
    def predict(self, ctx_x: Tensor, ctx_v: Tensor, q_v: Tensor, mean_latents: bool = False) -> Tensor:
        """Render the query viewpoints (B, 23) from contexts: (B, C, H, W) in [0, 1]."""
        return self.gen.sample(q_v[:, :self.cfg.v_dim], self.represent(ctx_x, ctx_v, q_v), mean_latents=mean_latents)

    def run_settings(self) -> dict:
        """The settings the trainer records (config.json, checkpoint): ``{"gqn": GQNConfig fields}``."""
        return {"gqn": asdict(self.cfg)}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "GQN":
        """The GQN of a trainer checkpoint (its ``settings["gqn"]`` and weights), in eval mode."""
        try:
            cfg = GQNConfig(**_renamed(ckpt["settings"]["gqn"]))
        except (KeyError, TypeError) as e:
            raise UserError(f"the checkpoint is not a GQN run ({e})") from e
        model = cls(cfg)
        model.load_state_dict(ckpt["model"])
        return model.eval()

    @classmethod
    def from_run(cls, run, device: str = "cpu") -> tuple["GQN", dict]:
        """``plato_core.runinfo.load_run`` for GQN runs: (model in eval mode, the run's settings)."""
        from plato_core.trainer import load_checkpoint

        ckpt = load_checkpoint(run)
        return cls.from_checkpoint(ckpt).to(device), ckpt.get("settings", {})


def _renamed(settings: dict) -> dict:
    """GQN settings of older runs under today's names (``steps`` became ``gen_steps``) and values (epipolar runs
    from before ``epipolar_features`` read 32 features, and from before ``ray_cell`` cast a ray per 2x2 pixels)."""
    settings = dict(settings)
    settings.setdefault("epipolar_features", 32)
    settings.setdefault("ray_cell", 2)  # runs from before ray_cell cast one ray per 2x2 pixels
    if "steps" in settings:
        settings.setdefault("gen_steps", settings.pop("steps"))
    return settings
