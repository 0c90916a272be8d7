"""open3d renders headlessly (lavapipe) through scene3d.viz."""

import numpy as np
import open3d as o3d
import torch
from PIL import Image

from renderers.cameras import Camera, look_at
from scene3d.viz import Offscreen, snapshot


def test_snapshot_png_not_blank(tmp_path):
    mesh = o3d.geometry.TriangleMesh.create_sphere(radius=1.0)
    mesh.paint_uniform_color([0.1, 0.3, 0.9])
    out = snapshot([mesh], tmp_path / "snap.png", size=(96, 128))
    img = np.asarray(Image.open(out)).astype(int)
    assert img.shape == (96, 128, 3)
    background = img[0, 0]
    np.testing.assert_array_equal(background, [255, 255, 255])
    centre = img[48, 64]
    assert centre[2] > centre[0] + 40, f"centre pixel {centre} is not the blue sphere"
    object_px = (np.abs(img - background).sum(-1) > 30).mean()
    assert 0.1 < object_px < 0.9


def test_offscreen_camera_matches_projection():
    # a small unit-size box at a known world point lands where our Camera projects it
    box = o3d.geometry.TriangleMesh.create_box(0.2, 0.2, 0.2).translate([0.9, -0.1, -0.1])
    box.paint_uniform_color([1, 0, 0])
    R, t = look_at(torch.tensor([[0.0, -4.0, 1.0]]), torch.zeros(1, 3), up=(0, 0, 1))
    cam = Camera.create(R, t, (64, 64), fov=0.7)
    with Offscreen(64, 64, lit=False) as r:
        r.add_geometry("box", box)
        img = r.render(cam)[0].astype(int)
    red = (img[..., 0] > 200) & (img[..., 1] < 80)
    rows, cols = np.nonzero(red)
    uv, _ = cam.project(torch.tensor([[[1.0, 0.0, 0.0]]]))
    assert red.sum() > 4
    assert abs(cols.mean() + 0.5 - uv[0, 0, 0].item()) < 1.0
    assert abs(rows.mean() + 0.5 - uv[0, 0, 1].item()) < 1.0
