"""Multi-view datasets: shards round trip, generators, GQN tfrecords and NeRF folders."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from plato_core.runinfo import UserError
from renderers.cameras import Camera, look_at
from scene3d.data import MultiViewDataset, batch_cameras, load_gqn_tfrecord, load_nerf_folder, write_gqn_tfrecord
from scene3d.generators import generate, self_avoiding_walk


def random_dataset(n=3, v=4, s=8, seed=0):
    rng = np.random.default_rng(seed)
    eye = torch.from_numpy(rng.normal(size=(n * v, 3)) * 3)
    R, t = look_at(eye, torch.zeros(n * v, 3, dtype=torch.float64), up=(0.0, 0.0, 1.0))
    cam = Camera.create(R, t, (s, s), fov=0.8)
    arr = {k: getattr(cam, k).float().numpy().reshape(n, v, *getattr(cam, k).shape[1:])
           for k in ("R", "t", "focal", "principal")}
    images = rng.integers(0, 256, (n, v, s, s, 3), dtype=np.uint8)
    return MultiViewDataset(images, **arr, factors={"a": np.arange(n), "b": rng.normal(size=(n, 2))},
                            meta={"background": [0, 0, 0]}, occupancy=rng.random((n, 4, 4, 4)) > 0.5)


def test_shards_round_trip(tmp_path):
    d = random_dataset(5)
    d.save(tmp_path / "d", shard_size=2)
    e = MultiViewDataset.load(tmp_path / "d")
    assert len(json.loads((tmp_path / "d/meta.json").read_text())["shards"]) == 3
    np.testing.assert_array_equal(d.images, e.images)
    np.testing.assert_array_equal(d.occupancy, e.occupancy)
    np.testing.assert_array_equal(d.factors["b"], e.factors["b"])
    item = e[1]
    assert item["images"].shape == (4, 3, 8, 8) and item["images"].max() <= 1
    batch = torch.utils.data.default_collate([e[0], e[1]])
    cams = batch_cameras(batch, (8, 8))
    assert len(cams) == 8
    torch.testing.assert_close(cams.R[4:8], torch.from_numpy(d.R[1]))
    one = batch_cameras(e[1], (8, 8))  # an item (V, ...) gives the same V cameras as its row of the batch
    assert len(one) == 4
    for k in ("R", "t", "focal", "principal"):
        torch.testing.assert_close(getattr(one, k), getattr(cams, k)[4:8])
    with pytest.raises(UserError, match="meta.json"):
        MultiViewDataset.load(tmp_path)


def test_self_avoiding_walk_is_connected_and_distinct():
    for seed in range(20):
        p = self_avoiding_walk(7, np.random.default_rng(seed))
        assert len({tuple(q) for q in p}) == 7
        assert (np.abs(np.diff(p, axis=0)).sum(1) == 1).all()


@pytest.mark.parametrize("kind", ["shepard-metzler", "rooms"])
def test_generator_writes_dataset(tmp_path, kind):
    generate(kind, tmp_path / kind, 2, views=3, size=32, seed=3, renderer="pytorch3d", progress=False)
    d = MultiViewDataset.load(tmp_path / kind)
    assert d.images.shape == (2, 3, 32, 32, 3) and d.occupancy.shape == (2, 32, 32, 32)
    assert d.occupancy.any() and (tmp_path / kind / "meshes/scene-000001.ply").is_file()
    bg = np.asarray(d.background) * 255
    fg = (np.abs(d.images.astype(int) - bg).max(-1) > 10).mean()
    assert 0.02 < fg < 0.95, fg  # something is drawn, not everything
    if kind == "shepard-metzler":
        assert int(d.factors["n_cubes"][0]) == 7 and np.isfinite(d.factors["colors"]).all()
        # cameras look at the origin from distance 6.5
        np.testing.assert_allclose(np.linalg.norm(d.scene(0).cameras.center.numpy(), axis=1), 6.5, rtol=1e-5)
    # same seed -> same scene, regardless of how many scenes were generated
    generate(kind, tmp_path / "again", 1, views=3, size=32, seed=3, renderer="pytorch3d", progress=False,
             meshes=False)
    np.testing.assert_array_equal(MultiViewDataset.load(tmp_path / "again").images[0], d.images[0])
    with pytest.raises(UserError, match="already"):
        generate(kind, tmp_path / kind, 1, renderer="pytorch3d", progress=False)


def test_open3d_generator_agrees_with_pytorch3d_on_silhouettes(tmp_path):
    generate("shepard-metzler", tmp_path / "o3d", 1, views=2, size=32, seed=5, progress=False, meshes=False)
    generate("shepard-metzler", tmp_path / "p3d", 1, views=2, size=32, seed=5, renderer="pytorch3d",
             progress=False, meshes=False)
    a, b = (MultiViewDataset.load(tmp_path / k).images[0].max(-1) > 10 for k in ("o3d", "p3d"))
    assert (a & b).sum() / (a | b).sum() > 0.97  # 0.93 when open3d was half a pixel off (scene3d.viz)


def test_gqn_tfrecord_reader(tmp_path):
    rng = np.random.default_rng(0)
    N, V, S = 2, 3, 16
    images = np.zeros((N, V, S, S, 3), np.uint8)
    images[..., 0] = np.linspace(0, 255, S, dtype=np.uint8)  # smooth, so JPEG keeps it
    cams5 = np.concatenate([rng.normal(size=(N, V, 3)), rng.uniform(-3, 3, (N, V, 1)),
                            rng.uniform(-1, 1, (N, V, 1))], -1).astype(np.float32)
    write_gqn_tfrecord(tmp_path / "x.tfrecord", images, cams5)
    d = load_gqn_tfrecord(tmp_path / "x.tfrecord")
    assert d.images.shape == (N, V, S, S, 3)
    assert np.abs(d.images.astype(int) - images).max() <= 8
    cam = d.scene(1).cameras
    v5 = cam.to_gqn()
    torch.testing.assert_close(v5[:, :3], torch.from_numpy(cams5[1, :, :3]), atol=1e-4, rtol=0)
    dyaw = (v5[:, 3] - torch.from_numpy(cams5[1, :, 3]) + math.pi) % (2 * math.pi) - math.pi
    assert dyaw.abs().max() < 1e-4
    torch.testing.assert_close(v5[:, 4], torch.from_numpy(cams5[1, :, 4]), atol=1e-4, rtol=0)
    assert load_gqn_tfrecord(tmp_path / "x.tfrecord", image_size=8).images.shape == (N, V, 8, 8, 3)


def test_nerf_folder_reader(tmp_path):
    c2w = np.eye(4)
    c2w[:3, 3] = [0, 0, 4]  # OpenGL: at +z looking down -z at the origin
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = [255, 0, 0, 255]
    (tmp_path / "train").mkdir()
    Image.fromarray(rgba).save(tmp_path / "train/r_0.png")
    (tmp_path / "transforms_train.json").write_text(json.dumps(
        {"camera_angle_x": 0.9, "frames": [{"file_path": "./train/r_0", "transform_matrix": c2w.tolist()}]}))
    d = load_nerf_folder(tmp_path, background=(1, 1, 1))
    assert d.images.shape == (1, 1, 8, 8, 3)
    assert tuple(d.images[0, 0, 0, 0]) == (255, 255, 255) and tuple(d.images[0, 0, 3, 3]) == (255, 0, 0)
    cam = d.scene(0).cameras
    torch.testing.assert_close(cam.center[0], torch.tensor([0.0, 0, 4]))
    uv, z = cam.project(torch.zeros(1, 1, 3))
    torch.testing.assert_close(uv[0, 0], torch.tensor([4.0, 4.0]))
    assert z.item() == pytest.approx(4.0)
    # nerfstudio intrinsics
    (tmp_path / "transforms_train.json").write_text(json.dumps(
        {"fl_x": 10.0, "fl_y": 11.0, "cx": 4.0, "cy": 4.0, "w": 8, "h": 8,
         "frames": [{"file_path": "train/r_0.png", "transform_matrix": c2w.tolist()}]}))
    cam = load_nerf_folder(tmp_path).scene(0).cameras
    torch.testing.assert_close(cam.focal[0], torch.tensor([10.0, 11.0]))
    with pytest.raises(UserError, match="no transforms"):
        load_nerf_folder(tmp_path / "train")


def _one_line_error(fn, match):
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_damaged_dataset_folder_is_one_line(tmp_path):
    random_dataset(4).save(tmp_path / "d", shard_size=2)
    meta = tmp_path / "d/meta.json"
    good = meta.read_text()
    meta.write_text(good[: len(good) // 2])  # truncated
    assert "meta.json" in _one_line_error(lambda: MultiViewDataset.load(tmp_path / "d"), "not valid JSON")
    meta.write_text("[]")
    _one_line_error(lambda: MultiViewDataset.load(tmp_path / "d"), "JSON object")
    meta.write_text(good)
    shard = tmp_path / "d/shard-00001.npz"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    assert "shard-00001.npz" in _one_line_error(lambda: MultiViewDataset.load(tmp_path / "d"), "unreadable shard")
    np.savez(shard, images=np.zeros((2, 4, 8, 8, 3), np.uint8))  # a shard without cameras
    _one_line_error(lambda: MultiViewDataset.load(tmp_path / "d"), "lack the arrays R, t, focal, principal")
    z = dict(np.load(tmp_path / "d/shard-00000.npz"))
    np.savez(shard, **{**z, "images": np.zeros((2, 4, 6, 6, 3), np.uint8)})  # another image size
    _one_line_error(lambda: MultiViewDataset.load(tmp_path / "d"), "differ in shape")


def _nerf_scene(root, sizes=(8, 8), matrix=None):
    c2w = np.eye(4)
    c2w[:3, 3] = [0, 0, 4]
    frames = []
    for i, s in enumerate(sizes):
        Image.fromarray(np.full((s, s, 4), 255, np.uint8)).save(root / f"r_{i}.png")
        frames.append({"file_path": f"r_{i}.png", "transform_matrix": (c2w if matrix is None else matrix).tolist()})
    (root / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 0.9, "frames": frames}))


def test_bad_nerf_folder_is_one_line(tmp_path):
    _nerf_scene(tmp_path, sizes=(8, 8))
    assert load_nerf_folder(tmp_path).images.shape == (1, 2, 8, 8, 3)
    _nerf_scene(tmp_path, sizes=(8, 6))
    assert "r_1.png" in _one_line_error(lambda: load_nerf_folder(tmp_path), "6x6 px, frame 0 is 8x8")
    assert load_nerf_folder(tmp_path, image_size=4).images.shape == (1, 2, 4, 4, 3)  # resized: one size
    (tmp_path / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 0.9, "frames": []}))
    _one_line_error(lambda: load_nerf_folder(tmp_path), "'frames' is empty")
    _nerf_scene(tmp_path, sizes=(8, 8))
    (tmp_path / "r_1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert "r_1.png" in _one_line_error(lambda: load_nerf_folder(tmp_path), "unreadable")
    png = (tmp_path / "r_0.png").read_bytes()
    (tmp_path / "r_1.png").write_bytes(png[: len(png) // 2])  # truncated
    _one_line_error(lambda: load_nerf_folder(tmp_path), "frame 1: .*unreadable")
    bad = np.eye(4)
    bad[0, 3] = np.nan
    _nerf_scene(tmp_path, matrix=bad)
    _one_line_error(lambda: load_nerf_folder(tmp_path), "frame 0: transform_matrix holds NaN")


def test_import_gqn_takes_the_background_from_the_borders(tmp_path, capsys):
    """gqn-datasets tfrecords carry no masks. ``scene3d data import-gqn`` takes the background colour from the
    views' borders, with a tolerance that covers JPEG noise: on Shepard-Metzler views written as JPEG records,
    the foreground it finds matches the renderer's own (the exact images against the known background), where
    the fixed tolerance of rendered data does not."""
    from scene3d.cli import main
    from scene3d.metrics import foreground_mask

    generate("shepard-metzler", tmp_path / "sm", 4, views=3, size=64, seed=2, renderer="pytorch3d",
             progress=False, meshes=False)
    sm = MultiViewDataset.load(tmp_path / "sm")
    cams5 = np.stack([sm.scene(i).cameras.to_gqn().numpy() for i in range(len(sm))]).astype(np.float32)
    write_gqn_tfrecord(tmp_path / "sm.tfrecord", sm.images, cams5)
    assert main(["data", "import-gqn", str(tmp_path / "sm.tfrecord"), "--out", str(tmp_path / "imp")]) == 0
    assert "from the views' borders" in capsys.readouterr().out
    imp = MultiViewDataset.load(tmp_path / "imp")
    assert np.abs(np.array(imp.background) - np.array(sm.background)).max() <= 2 / 255
    as_float = lambda d: torch.from_numpy(d.images.reshape(-1, *d.images.shape[2:])).permute(0, 3, 1, 2) / 255.0
    truth = foreground_mask(as_float(sm), sm.background)
    found = foreground_mask(as_float(imp), imp.background, imp.background_tol)
    iou = float((truth & found).sum() / (truth | found).sum())
    fixed = foreground_mask(as_float(imp), imp.background)
    assert float((truth & fixed).sum() / (truth | fixed).sum()) < 0.9  # JPEG ringing around the edges
    assert iou > 0.97 and float((truth == found).float().mean()) > 0.99
    # a room has no backdrop: its borders are not one colour, and no background is claimed
    rng = np.random.default_rng(0)
    write_gqn_tfrecord(tmp_path / "room.tfrecord", rng.integers(0, 255, (2, 3, 16, 16, 3), dtype=np.uint8),
                       cams5[:2])
    assert main(["data", "import-gqn", str(tmp_path / "room.tfrecord"), "--out", str(tmp_path / "room")]) == 0
    assert "no masked PSNR" in capsys.readouterr().out
    assert MultiViewDataset.load(tmp_path / "room").background is None
    assert main(["data", "import-gqn", "--out", str(tmp_path / "none")]) == 2
    assert main(["data", "import-gqn", str(tmp_path / "sm.tfrecord"), "--out", str(tmp_path / "imp")]) == 2


def test_open3d_generator_restarts_a_stalled_render(tmp_path, monkeypatch):
    """A render that hangs (as Filament on llvmpipe did) is killed and redone, giving the same images."""
    generate("shepard-metzler", tmp_path / "plain", 2, views=2, size=32, seed=5, progress=False, meshes=False)
    stall = tmp_path / "stall"
    stall.touch()
    monkeypatch.setenv("PLATO_TEST_STALL_ONCE", str(stall))
    generate("shepard-metzler", tmp_path / "stalled", 2, views=2, size=32, seed=5, progress=False, meshes=False,
             stall_s=5.0)
    assert not stall.exists()  # the hook fired: scene 1's first render hung
    a, b = (MultiViewDataset.load(tmp_path / k).images for k in ("plain", "stalled"))
    np.testing.assert_array_equal(a, b)


def test_open3d_stall_limit_follows_the_scenes_pace():
    """A stalled open3d process is cut short relative to the scenes' own pace, and each retry doubles the limit."""
    from scene3d.generators import STALL_MIN_S, STALL_PACE, START_S, _WatchedRenderer

    r = _WatchedRenderer("shepard-metzler", 0, 2, 7, (0, 0, 0))
    assert r._limit(0) == START_S  # the first process: start-up included
    r.fresh, r.paces = False, [0.25, 0.3, 0.2]
    assert r._limit(0) == STALL_MIN_S
    assert r._limit(2) == 4 * STALL_MIN_S
    r.paces = [1.0, 2.0, 30.0]  # a busy machine: the median, not the outlier
    assert r._limit(0) == STALL_PACE * 2.0
    fixed = _WatchedRenderer("rooms", 0, 2, 7, (1, 1, 1), stall_s=5.0)
    fixed.fresh, fixed.paces = False, [0.25]
    assert fixed._limit(1) == 10.0  # an explicit limit overrides the pace


def test_specular_shading_keeps_silhouettes_and_adds_highlights(tmp_path):
    kw = dict(views=4, size=32, seed=2, renderer="pytorch3d", progress=False, meshes=False)
    generate("shepard-metzler", tmp_path / "flat", 1, **kw)
    generate("shepard-metzler", tmp_path / "shiny", 1, specular=0.6, **kw)
    a, b = (MultiViewDataset.load(tmp_path / k).images[0].astype(int) for k in ("flat", "shiny"))
    ma, mb = a.max(-1) > 10, b.max(-1) > 10
    assert (ma & mb).sum() / (ma | mb).sum() > 0.97  # the same rasteriser and cameras: the same objects
    assert np.abs(a - b)[ma].mean() > 2  # shaded differently
    # a white highlight: Phong adds the same amount to every channel, so the brightest pixels turn grey-white
    assert (b.min(-1)[mb].max()) > (a.min(-1)[ma].max()) + 20
    with pytest.raises(UserError, match="specular"):
        generate("shepard-metzler", tmp_path / "o3d", 1, views=2, size=32, specular=0.3, progress=False)
