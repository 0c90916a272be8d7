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


def test_offscreen_is_registered_to_the_pixel_convention():
    """A small sphere's silhouette centroid lies at its projected centre to a fraction of a pixel (pixel centres at
    +0.5). With OpenCV's integer-centred K, open3d drew every image half a pixel up and to the left."""
    R, t = look_at(torch.tensor([[0.3, -5.0, 0.4]], dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64),
                   up=(0, 0, 1))
    for size in ((64, 64), (48, 80)):
        cam = Camera.create(R, t, size, fov=np.radians(45))
        rows, cols = np.mgrid[:size[0], :size[1]] + 0.5
        for p in ([0.0, 0.0, 0.0], [0.6, 0.0, 0.5], [-0.7, 0.2, -0.4]):
            sphere = o3d.geometry.TriangleMesh.create_sphere(0.25, 40).translate(p)
            sphere.paint_uniform_color([1, 1, 1])
            with Offscreen(size[1], size[0], background=(0, 0, 0), lit=False) as r:
                r.add_geometry("s", sphere)
                mask = r.render(cam)[0].max(-1) > 0
            uv, _ = cam.project(torch.tensor([[p]], dtype=torch.float64))
            # perspective moves a sphere's silhouette centroid off its centre's projection by < 0.2 px here
            assert abs(cols[mask].mean() - uv[0, 0, 0].item()) < 0.2, (size, p)
            assert abs(rows[mask].mean() - uv[0, 0, 1].item()) < 0.2, (size, p)
