"""Multi-view scene datasets: V images + V ``Camera`` s + ground-truth factors per scene.

One in-memory type, :class:`MultiViewDataset`, and its on-disk form (a folder)::

    DIR/meta.json           format, generator, scenes, views, image_size, background, shards, factors
    DIR/shard-00000.npz     images (n, V, H, W, 3) uint8; R (n, V, 3, 3), t (n, V, 3), focal (n, V, 2),
                            principal (n, V, 2) float32 in the renderers.cameras convention;
                            factor_<name> arrays (n, ...); optionally occupancy (n, 32, 32, 32) bit-packed
    DIR/meshes/scene-000000.ply   ground-truth object meshes (procedural generators only)

Readers for external formats return the same type:

* :func:`load_gqn_tfrecord`: DeepMind's gqn-datasets (``frames``: one JPEG per view,
  ``cameras``: 5 floats per view ``x, y, z, yaw, pitch``), without TensorFlow.
* :func:`load_nerf_folder`: NeRF-Blender / nerfstudio ``transforms_{split}.json`` folders.

Items (``dataset[i]``) are dicts that the default collate stacks:
``images`` (V, 3, H, W) float32 in [0, 1], ``R`` (V, 3, 3), ``t`` (V, 3), ``focal`` (V, 2),
``principal`` (V, 2) and ``index``. :func:`batch_cameras` turns a batch back into a ``Camera``.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from plato_core.runinfo import UserError, atomic_path, atomic_write, one_line, read_json
from renderers.cameras import Camera

FORMAT = "plato-multiview-1"
CAMERA_KEYS = ("R", "t", "focal", "principal")


@dataclass
class MultiViewScene:
    """One scene: ``images`` (V, 3, H, W) float in [0, 1], V ``cameras``, and its ``factors``."""

    images: Tensor
    cameras: Camera
    factors: dict = field(default_factory=dict)


class MultiViewDataset(torch.utils.data.Dataset):
    """N scenes of V views each, held as uint8 images and float32 camera arrays.

    Args:
        images: (N, V, H, W, 3) uint8.
        R, t, focal, principal: (N, V, 3, 3), (N, V, 3), (N, V, 2), (N, V, 2) camera parameters.
        factors: name -> (N, ...) array of ground-truth scene factors.
        meta: free-form description (generator, background colour, fov ...).
        occupancy: optional (N, G, G, G) bool occupancy grids of the objects.
    """

    def __init__(self, images: np.ndarray, R: np.ndarray, t: np.ndarray, focal: np.ndarray, principal: np.ndarray,
                 factors: dict | None = None, meta: dict | None = None, occupancy: np.ndarray | None = None):
        if images.ndim != 5 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images: expected (N, V, H, W, 3) uint8, got {images.shape} {images.dtype}")
        N, V = images.shape[:2]
        for name, arr, tail in (("R", R, (3, 3)), ("t", t, (3,)), ("focal", focal, (2,)),
                                ("principal", principal, (2,))):
            if arr.shape != (N, V, *tail):
                raise ValueError(f"{name}: expected shape {(N, V, *tail)}, got {arr.shape}")
        self.images = images
        self.R, self.t = R.astype(np.float32), t.astype(np.float32)
        self.focal, self.principal = focal.astype(np.float32), principal.astype(np.float32)
        self.factors = factors or {}
        self.meta = meta or {}
        self.occupancy = occupancy

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def views(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:4])

    @property
    def background(self) -> tuple[float, float, float] | None:
        bg = self.meta.get("background")
        return tuple(bg) if bg is not None else None

    @property
    def background_tol(self) -> float:
        """How far (per channel, in [0, 1]) a pixel may be from ``background`` and still be background: 4/255 for
        rendered data, more for JPEG frames (``meta["background_tol"]``, see :func:`background_from_borders`)."""
        return float(self.meta.get("background_tol", 4 / 255))

    def __getitem__(self, i: int) -> dict:
        img = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(0, 3, 1, 2).float() / 255
        item = {k: torch.from_numpy(getattr(self, k)[i]) for k in CAMERA_KEYS}
        return {"images": img, **item, "index": i}

    def scene(self, i: int) -> MultiViewScene:
        item = self[i]
        cams = batch_cameras(item, self.image_size)
        return MultiViewScene(item["images"], cams, {k: v[i] for k, v in self.factors.items()})

    def subset(self, idx) -> "MultiViewDataset":
        idx = np.asarray(idx)
        occ = self.occupancy[idx] if self.occupancy is not None else None
        return MultiViewDataset(self.images[idx], self.R[idx], self.t[idx], self.focal[idx], self.principal[idx],
                                {k: v[idx] for k, v in self.factors.items()}, dict(self.meta), occ)

    # ------------------------------------------------------------------ disk
    @classmethod
    def load(cls, root: str | Path) -> "MultiViewDataset":
        """Read a dataset folder written by :func:`save` / the generators.

        A damaged ``meta.json`` or shard (truncated, missing arrays, shapes that disagree) is one
        ``UserError`` line naming the file.
        """
        root = Path(root)
        meta = _read_meta(root)
        arr = _read_shards(root, meta)
        occ = None
        try:
            if "occupancy" in arr:
                g = int(meta["occupancy"]["resolution"])
                occ = np.unpackbits(arr["occupancy"], axis=1)[:, :g ** 3].reshape(-1, g, g, g).astype(bool)
            factors = {k[len("factor_"):]: v for k, v in arr.items() if k.startswith("factor_")}
            return cls(arr["images"], arr["R"], arr["t"], arr["focal"], arr["principal"], factors, meta, occ)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{root}: the shards do not form a dataset ({one_line(e)})") from None

    def save(self, root: str | Path, shard_size: int = 500) -> Path:
        """Write this dataset as a folder of shards (see the module docstring)."""
        w = ShardWriter(root, shard_size)
        for i in range(len(self)):
            occ = self.occupancy[i] if self.occupancy is not None else None
            w.add(self.images[i], {k: getattr(self, k)[i] for k in CAMERA_KEYS},
                  {k: v[i] for k, v in self.factors.items()}, occ)
        return w.close(self.meta)


def _read_meta(root: Path) -> dict:
    """``root/meta.json`` checked: a JSON object of format :data:`FORMAT` listing its shards."""
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{root}: not a Plato multi-view dataset (no meta.json; make one with `scene3d data`)")
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    shards = meta.get("shards")
    if not (isinstance(shards, list) and shards and all(isinstance(x, dict) and isinstance(x.get("file"), str)
                                                        for x in shards)):
        raise UserError(f"{meta_path}: 'shards' must be a non-empty list of {{\"file\": ...}} entries")
    return meta


def _read_shards(root: Path, meta: dict) -> dict[str, np.ndarray]:
    """The arrays of every shard listed in ``meta``, concatenated along the scene axis."""
    import zipfile
    import zlib

    parts: dict[str, list] = {}
    for shard in meta["shards"]:
        path = root / shard["file"]
        if not path.is_file():
            raise UserError(f"{path}: missing shard listed in meta.json")
        try:
            with np.load(path, allow_pickle=False) as z:
                if not hasattr(z, "files"):
                    raise ValueError("a single array, not an .npz archive")
                for k in z.files:
                    parts.setdefault(k, []).append(z[k])
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise UserError(f"{path}: unreadable shard ({one_line(e)}); the file is damaged (truncated?)") from None
    missing = [k for k in ("images", *CAMERA_KEYS) if len(parts.get(k, ())) != len(meta["shards"])]
    if missing:
        raise UserError(f"{root}: shards lack the arrays {', '.join(missing)}")
    try:
        return {k: np.concatenate(v) for k, v in parts.items()}
    except ValueError as e:
        raise UserError(f"{root}: the shards' arrays differ in shape ({one_line(e)})") from None


class ShardWriter:
    """Stream scenes into ``shard-XXXXX.npz`` files; :meth:`close` writes ``meta.json`` last."""

    def __init__(self, root: str | Path, shard_size: int = 500):
        self.root, self.shard_size = Path(root), shard_size
        self.root.mkdir(parents=True, exist_ok=True)
        self.buf: list[dict] = []
        self.shards: list[dict] = []
        self.grid: int | None = None

    def add(self, images: np.ndarray, cams: dict, factors: dict, occupancy: np.ndarray | None = None) -> None:
        """images (V, H, W, 3) uint8; cams: R, t, focal, principal arrays (V, ...); factors: name -> array."""
        rec = {"images": images, **{k: np.asarray(cams[k], np.float32) for k in CAMERA_KEYS},
               **{f"factor_{k}": np.asarray(v) for k, v in factors.items()}}
        if occupancy is not None:
            self.grid = occupancy.shape[0]
            rec["occupancy"] = np.packbits(occupancy.reshape(-1))
        self.buf.append(rec)
        if len(self.buf) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self.buf:
            return
        name = f"shard-{len(self.shards):05d}.npz"
        arrays = {k: np.stack([r[k] for r in self.buf]) for k in self.buf[0]}
        bio = io.BytesIO()
        np.savez(bio, **arrays)
        atomic_write(self.root / name, bio.getvalue())
        self.shards.append({"file": name, "scenes": len(self.buf)})
        self.buf = []

    def close(self, meta: dict) -> Path:
        self._flush()
        meta = {**meta, "format": FORMAT, "scenes": sum(s["scenes"] for s in self.shards), "shards": self.shards}
        if self.grid is not None:
            meta.setdefault("occupancy", {})["resolution"] = self.grid
        atomic_write(self.root / "meta.json", json.dumps(meta, indent=2))
        return self.root


def batch_cameras(batch: dict, image_size: tuple[int, int]) -> Camera:
    """The one way to build a ``Camera`` from dataset arrays: the camera keys of an item (V, ...) or of a
    collated batch (B, V, ...) -> V or B * V cameras, scene-major (scene b's views are ``b * V .. b * V + V - 1``).

    ``image_size`` is the images' ``(H, W)`` in pixels. Take a subset of the result with ``Camera.__getitem__``.
    """
    lead = batch["R"].dim() - 2  # the (B, V) or (V,) dims before each key's own shape
    return Camera(*(batch[k].reshape(-1, *batch[k].shape[lead:]) for k in CAMERA_KEYS), image_size)


def camera_arrays(cameras: Camera) -> dict[str, np.ndarray]:
    """A ``Camera`` of V views as the float32 arrays a shard stores."""
    return {k: getattr(cameras, k).detach().cpu().float().numpy() for k in CAMERA_KEYS}


# ------------------------------------------------------------------ GQN tfrecords
def load_gqn_tfrecord(paths, image_size: int | None = None, fov: float = math.radians(45),
                      max_scenes: int | None = None) -> MultiViewDataset:
    """Read DeepMind gqn-datasets tfrecord files without TensorFlow.

    Each record is a ``tf.train.Example`` with ``frames`` (bytes list: one JPEG per view)
    and ``cameras`` (float list: ``x, y, z, yaw, pitch`` per view, radians, z-up world).
    Cameras become Plato cameras through ``Camera.from_gqn`` with horizontal ``fov`` (rad).

    Args:
        paths: one path or a list of ``.tfrecord`` files.
        image_size: resize the frames to this square size (default: keep).
        max_scenes: stop after this many records.
    """
    from PIL import Image
    from tfrecord import example_pb2
    from tfrecord.reader import tfrecord_iterator

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    images, cams = [], []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such tfrecord file")
        for k, raw in enumerate(tfrecord_iterator(str(path))):
            ex = example_pb2.Example.FromString(bytes(raw))
            feats = ex.features.feature
            if "frames" not in feats or "cameras" not in feats:
                raise UserError(f"{path}: record {k} lacks the 'frames' / 'cameras' features of gqn-datasets")
            frames = list(feats["frames"].bytes_list.value)
            c = np.asarray(feats["cameras"].float_list.value, np.float32)
            if c.size != 5 * len(frames):
                raise UserError(f"{path}: record {k} has {len(frames)} frames but {c.size} camera floats "
                                f"(expected 5 per frame: x, y, z, yaw, pitch)")
            imgs = [Image.open(io.BytesIO(f)).convert("RGB") for f in frames]
            if image_size is not None:
                imgs = [im.resize((image_size, image_size), Image.BILINEAR) for im in imgs]
            images.append(np.stack([np.asarray(im) for im in imgs]))
            cams.append(c.reshape(-1, 5))
            if max_scenes is not None and len(images) >= max_scenes:
                break
    if not images:
        raise UserError(f"{paths}: no records found")
    if len({im.shape for im in images}) != 1:
        raise UserError(f"{paths}: records differ in view count or frame size; pass image_size")
    images = np.stack(images)
    N, V, H, W, _ = images.shape
    cam = Camera.from_gqn(torch.from_numpy(np.concatenate(cams)).double(), (H, W), fov=fov)
    arr = {k: v.reshape(N, V, *v.shape[1:]) for k, v in camera_arrays(cam).items()}
    meta = {"source": "gqn-tfrecord", "fov": fov}
    found = background_from_borders(images)
    if found is not None:  # gqn-datasets carry no masks: the foreground is what differs from the background
        meta.update(background=list(found[0]), background_tol=found[1], background_from="the views' borders")
    return MultiViewDataset(images, **arr, meta=meta)


def background_from_borders(images: np.ndarray, near: float = 12 / 255, share: float = 0.9,
                            max_scenes: int = 200) -> tuple[tuple[float, float, float], float] | None:
    """The background colour of (N, V, H, W, 3) uint8 views and the tolerance that separates it from the
    objects (of up to ``max_scenes`` scenes); None when the views' borders are not one colour (fewer than
    ``share`` of the border pixels within ``near`` of their median: a room, not an object on a backdrop).

    The colour is the per-channel median of the border pixels. The tolerance is Otsu's threshold on every
    pixel's largest channel deviation from it (the one that best splits backdrop from objects), and at least
    the backdrop's own noise (the 99th percentile of the border's deviations, plus 1/255) and 4/255. Why not a
    fixed 4/255, as for rendered data: JPEG frames ring around the objects' edges. On Shepard-Metzler views
    written as JPEG records (64 px), a fixed 4/255 found the rendered foreground with IoU 0.79, the border's
    noise level 0.86, Otsu's threshold 0.99.
    """
    x = images[:max_scenes].astype(np.float32) / 255
    border = np.concatenate([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], axis=2).reshape(-1, 3)
    colour = np.median(border, 0)
    dev = np.abs(border - colour).max(1)
    inside = dev <= near
    if inside.mean() < share:
        return None
    noise = float(np.percentile(dev[inside], 99)) + 1 / 255
    tol = max(4 / 255, noise, _otsu(np.abs(x - colour).max(-1).ravel()))
    return tuple(float(round(c * 255) / 255) for c in colour), round(tol, 5)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1]: the bin edge that maximises the between-class variance."""
    h, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(h)
    w1 = w0[-1] - w0
    m0 = np.cumsum(h * centres)
    mu0, mu1 = m0 / np.maximum(w0, 1), (m0[-1] - m0) / np.maximum(w1, 1)
    return float(edges[1:][np.argmax(w0 * w1 * (mu0 - mu1) ** 2)])


def write_gqn_tfrecord(path: str | Path, images: np.ndarray, cameras5: np.ndarray, quality: int = 95) -> None:
    """Write scenes in gqn-datasets' record layout (for tests and interop).

    images: (N, V, H, W, 3) uint8; cameras5: (N, V, 5) ``x, y, z, yaw, pitch``.
    """
    from PIL import Image
    from tfrecord.writer import TFRecordWriter

    with atomic_path(path) as tmp:
        w = TFRecordWriter(str(tmp))
        for imgs, cams in zip(images, cameras5):
            frames = []
            for im in imgs:
                b = io.BytesIO()
                Image.fromarray(im).save(b, format="JPEG", quality=quality)
                frames.append(b.getvalue())
            w.write({"frames": (frames, "byte"), "cameras": (cams.reshape(-1).astype(np.float32).tolist(), "float")})
        w.close()


# ---------------------------------------------------------------- NeRF folders
def load_nerf_folder(root: str | Path, split: str = "train", background=(1.0, 1.0, 1.0),
                     image_size: int | None = None) -> MultiViewDataset:
    """Read a NeRF-Blender / nerfstudio folder as one scene of V views.

    ``transforms_{split}.json`` (or ``transforms.json``) holds either ``camera_angle_x``
    (horizontal fov, radians) or ``fl_x``/``fl_y``/``cx``/``cy``/``w``/``h`` (pixels, nerfstudio),
    and per frame a ``file_path`` and a 4x4 OpenGL camera-to-world ``transform_matrix``.
    RGBA images are composited onto ``background`` (RGB in [0, 1]).
    """

    root = Path(root)
    tf = root / f"transforms_{split}.json"
    if not tf.is_file():
        tf = root / "transforms.json"
    if not tf.is_file():
        raise UserError(f"{root}: no transforms_{split}.json or transforms.json")
    meta = read_json(tf)
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list) or not frames:
        raise UserError(f"{tf}: 'frames' is empty; expected one entry per image")
    images, c2w = _nerf_frames(root, tf, frames, background, image_size)
    H, W = images[0].shape[:2]
    c2w_t = torch.from_numpy(np.stack(c2w))
    scale = 1.0
    if "fl_x" in meta:
        for key in ("fl_x", "fl_y", "cx", "cy", "w", "h"):
            v = meta.get(key, 1.0)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or key in ("cx", "cy"))):
                raise UserError(f"{tf}: {key} must be a finite number of pixels (positive), got {v!r}")
        w0 = meta.get("w", W)
        scale = W / w0
        fl = torch.tensor([[meta["fl_x"], meta.get("fl_y", meta["fl_x"])]], dtype=torch.float64) * scale
        pp = torch.tensor([[meta.get("cx", w0 / 2), meta.get("cy", meta.get("h", H / scale) / 2)]],
                          dtype=torch.float64) * scale
        cam = Camera.from_opengl_c2w(c2w_t, (H, W), focal=fl.expand(len(c2w), 2), principal=pp)
    elif "camera_angle_x" in meta:
        fov = meta["camera_angle_x"]
        if not (isinstance(fov, (int, float)) and 0 < fov < math.pi):
            raise UserError(f"{tf}: camera_angle_x must be a horizontal field of view in (0, pi) radians, got {fov!r}")
        cam = Camera.from_opengl_c2w(c2w_t, (H, W), fov=float(fov))
    else:
        raise UserError(f"{tf}: expected camera_angle_x or fl_x/fl_y/cx/cy")
    arr = {k: v[None] for k, v in camera_arrays(cam).items()}
    return MultiViewDataset(np.stack(images)[None], **arr,
                            meta={"source": "nerf", "split": split, "background": list(background)})


def estimate_background(images: Tensor) -> tuple[float, float, float]:
    """The background colour of (V, 3, H, W) views in [0, 1]: the per-channel median of their border pixels
    (objects are framed inside the views), rounded to 1/255."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], -1)
    med = border.transpose(0, 1).reshape(3, -1).median(-1).values
    return tuple(float(round(float(c) * 255) / 255) for c in med)


def _nerf_frames(root: Path, tf: Path, frames: list, background, image_size: int | None):
    """Each frame's image (H, W, 3) uint8 and camera-to-world matrix (4, 4); one UserError line per bad frame."""
    from PIL import Image

    images, c2w = [], []
    for k, fr in enumerate(frames):
        if not isinstance(fr, dict) or not isinstance(fr.get("file_path"), str):
            raise UserError(f"{tf}: frame {k}: expected an object with a 'file_path'")
        p = root / fr["file_path"]
        if not p.suffix:
            p = p.with_suffix(".png")
        if not p.is_file():
            raise UserError(f"{tf}: frame {k}: image {p} not found")
        try:
            with Image.open(p) as im:
                if image_size is not None:
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                rgba = np.asarray(im.convert("RGBA"))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for corrupt or truncated files
            raise UserError(f"{tf}: frame {k}: image {p} is unreadable ({one_line(e)})") from None
        if images and rgba.shape[:2] != images[0].shape[:2]:
            raise UserError(f"{tf}: frame {k}: image {p} is {rgba.shape[1]}x{rgba.shape[0]} px, frame 0 is "
                            f"{images[0].shape[1]}x{images[0].shape[0]}; every view must have one size")
        images.append(_composite(rgba, background))
        try:
            m = np.asarray(fr.get("transform_matrix"), np.float64)
        except (TypeError, ValueError):
            m = np.zeros(0)
        if m.shape != (4, 4):
            raise UserError(f"{tf}: frame {k}: transform_matrix must be 4x4 numbers, got shape {m.shape}")
        if not np.isfinite(m).all():
            raise UserError(f"{tf}: frame {k}: transform_matrix holds NaN or infinite values")
        c2w.append(m)
    return images, c2w


def _composite(rgba: np.ndarray, background) -> np.ndarray:
    """(H, W, 4) uint8 RGBA over a background RGB in [0, 1] -> (H, W, 3) uint8."""
    a = rgba[..., 3:4].astype(np.float32) / 255
    rgb = rgba[..., :3].astype(np.float32) / 255 * a + np.asarray(background, np.float32) * (1 - a)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
