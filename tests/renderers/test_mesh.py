"""Mesh renderer: analytic silhouettes and shading, PyTorch3D camera equivalence, gradients, bad input."""

import math

import pytest
import torch

from renderers.cameras import Camera, look_at
from renderers.mesh import MeshRenderer, ico_sphere


def camera_looking_at(centre, eye, image_size, ortho=False, **kw) -> Camera:
    eye = torch.tensor([eye], dtype=torch.float32)
    R, t = look_at(eye, torch.tensor([centre], dtype=torch.float32))
    if ortho:
        return Camera.create(R, t, image_size, pixel_size=kw.get("pixel_size", 0.02))
    return Camera.create(R, t, image_size, focal=kw.get("focal", 150.0))


def iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


@pytest.mark.parametrize("ortho", [False, True])
def test_ico_sphere_hard_silhouette_matches_disc(ortho):
    radius, centre, eye = 0.8, (0.2, -0.1, 0.3), (1.9, 1.2, -2.0)
    cam = camera_looking_at(centre, eye, (128, 128), ortho)
    verts, faces = ico_sphere(3, radius)
    verts = verts + torch.tensor(centre)
    sil = MeshRenderer("silhouette", soft=False)(verts[None], faces, cam)[0, 0] > 0.5
    d = math.dist(centre, eye)
    rho = radius / 0.02 if ortho else 150.0 * radius / math.sqrt(d**2 - radius**2)
    v, u = torch.meshgrid(torch.arange(128) + 0.5, torch.arange(128) + 0.5, indexing="ij")
    disc = (u - 64) ** 2 + (v - 64) ** 2 < rho**2
    assert iou(sil, disc) >= 0.98, iou(sil, disc)


def test_point_lands_on_the_pixel_the_camera_projects_it_to():
    cam = Camera.create(torch.eye(3)[None], torch.tensor([[0.0, 0.0, 4.0]]), (30, 50), focal=40.0,
                        principal=torch.tensor([[21.0, 12.0]]))
    p = torch.tensor([[[0.6, 0.9, 0.5]]])
    uv, _ = cam.project(p)
    u, v = uv[0, 0].tolist()
    # a small triangle (about 2 px) around p, facing the camera
    tri = p[0] + torch.tensor([[-0.12, -0.1, 0.0], [0.12, -0.1, 0.0], [0.0, 0.14, 0.0]])
    sil = MeshRenderer("silhouette", soft=False)(tri[None], torch.tensor([[0, 1, 2]]), cam)[0, 0]
    hit = sil.nonzero()
    assert len(hit) >= 1
    assert (hit[:, 0] - int(v)).abs().max() <= 2 and (hit[:, 1] - int(u)).abs().max() <= 2
    assert sil[int(v), int(u)] == 1


def test_flat_shading_of_a_facing_quad_is_ambient_plus_lambert():
    cam = Camera.create(torch.eye(3)[None], torch.tensor([[0.0, 0.0, 3.0]]), (16, 16), focal=20.0)
    quad = torch.tensor([[-1.0, -1.0, 0.0], [1.0, -1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 1.0, 0.0]])
    faces = torch.tensor([[0, 2, 1], [0, 3, 2]])  # normal cross(v1 - v0, v2 - v0) = -z: towards the camera
    n = torch.linalg.cross(quad[2] - quad[0], quad[1] - quad[0])
    assert n[2] < 0
    light = torch.tensor([0.3, -0.4, -1.0])
    colour = torch.tensor([0.9, 0.5, 0.2])
    r = MeshRenderer("shaded", soft=False, shading="flat", light_direction=light.tolist(), ambient=0.25,
                     diffuse=0.6, specular=0.0, background=(0.0, 0.0, 0.0))
    image = r(quad[None], faces, cam, colour.expand(1, 4, 3))[0]
    cos = torch.dot(-torch.tensor([0.0, 0.0, 1.0]), light / light.norm())
    want = colour * (0.25 + 0.6 * cos)
    torch.testing.assert_close(image[:, 5, 9], want, atol=1e-5, rtol=0)  # off the shared diagonal edge
    torch.testing.assert_close(image[:, 0, 0], torch.zeros(3))  # the quad spans 13.3 px; the corner is background


def pytorch3d_cameras(dist, elev, azim, fov_deg):
    from pytorch3d.renderer import FoVPerspectiveCameras, look_at_view_transform

    R, T = look_at_view_transform(dist, elev, azim)
    return FoVPerspectiveCameras(R=R, T=T, fov=fov_deg)


def plato_cameras(dist, elev, azim, fov_deg, size):
    e, a = torch.deg2rad(torch.tensor(elev)), torch.deg2rad(torch.tensor(azim))
    eye = dist * torch.stack([torch.cos(e) * torch.sin(a), torch.sin(e), torch.cos(e) * torch.cos(a)], -1)
    R, t = look_at(eye, torch.zeros_like(eye), up=(0.0, 1.0, 0.0))
    return Camera.create(R, t, size, fov=math.radians(fov_deg))


@pytest.mark.parametrize("mode", ["silhouette", "shaded"])
def test_our_camera_and_equivalent_pytorch3d_camera_give_identical_images(mode):
    from pytorch3d.renderer import (
        BlendParams,
        DirectionalLights,
        Materials,
        MeshRasterizer,
        RasterizationSettings,
        SoftPhongShader,
        SoftSilhouetteShader,
        TexturesVertex,
    )
    from pytorch3d.renderer import MeshRenderer as P3DMeshRenderer
    from pytorch3d.structures import Meshes

    dist, elev, azim, fov = 3.0, [20.0, -35.0], [30.0, 200.0], 50.0
    verts, faces = ico_sphere(2, 0.9)
    verts = verts * torch.tensor([1.0, 0.7, 1.2]) + torch.tensor([0.1, 0.2, -0.1])  # an ellipsoid, off-centre
    colors = (verts - verts.min(0).values) / (verts.max(0).values - verts.min(0).values)
    B, size = 2, (32, 32)
    sigma, gamma = 1e-3, 1e-2
    ours = MeshRenderer(mode, sigma=sigma, gamma=gamma, faces_per_pixel=10, light_direction=(0.2, 1.0, 0.5),
                        background=(0.1, 0.2, 0.3), znear=1.0, zfar=100.0, alpha=True)
    cam = plato_cameras(dist, elev, azim, fov, size)
    mine = ours(verts.expand(B, -1, -1), faces, cam, colors.expand(B, -1, -1) if mode == "shaded" else None)

    p3d_cam = pytorch3d_cameras(dist, elev, azim, fov)
    settings = RasterizationSettings(image_size=size, blur_radius=math.log(1 / 1e-4 - 1) * sigma, faces_per_pixel=10)
    blend = BlendParams(sigma=sigma, gamma=gamma, background_color=(0.1, 0.2, 0.3))
    if mode == "silhouette":
        shader = SoftSilhouetteShader(blend_params=blend)
    else:
        lights = DirectionalLights(direction=((0.2, 1.0, 0.5),), ambient_color=((0.3,) * 3,),
                                   diffuse_color=((0.7,) * 3,), specular_color=((0.2,) * 3,))
        shader = SoftPhongShader(cameras=p3d_cam, lights=lights, materials=Materials(shininess=32.0),
                                 blend_params=blend)
    meshes = Meshes([verts] * B, [faces] * B, textures=TexturesVertex([colors] * B))
    theirs = P3DMeshRenderer(MeshRasterizer(p3d_cam, settings), shader)(meshes, znear=1.0, zfar=100.0)
    theirs = theirs.permute(0, 3, 1, 2)
    if mode == "silhouette":
        theirs = theirs[:, 3:]
        assert mine.shape == (B, 1, *size)
    assert 0.05 < (mine[:, -1] > 0.5).float().mean() < 0.8
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)  # float32 camera round-off only


@pytest.mark.parametrize("backend", ["numba", "torch", "pytorch3d"])
def test_vertex_gradient_matches_finite_differences(backend):
    """A tilted planar hexagon fan: no face turns edge-on, where PyTorch3D drops degenerate faces (a jump)."""
    ang = torch.arange(6) * math.pi / 3
    ring = torch.stack([0.7 * torch.cos(ang), 0.6 * torch.sin(ang), 0.3 * torch.cos(ang)], -1)
    verts = torch.cat([torch.zeros(1, 3), ring])[None]
    faces = torch.tensor([[0, i, i % 6 + 1] for i in range(1, 7)])
    cam = camera_looking_at((0.0, 0.0, 0.0), (0.3, 0.4, -2.5), (24, 24), focal=30.0)
    r = MeshRenderer("silhouette", sigma=2e-3, faces_per_pixel=8, backend=backend)
    weights = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    loss = lambda v: (r(v, faces, cam) * weights).sum()  # noqa: E731
    v0 = verts.clone().requires_grad_()
    grad = torch.autograd.grad(loss(v0), v0)[0]
    h = 1e-3
    for vertex in (1, 3, 0):
        for axis in range(3):
            e = torch.zeros_like(verts)
            e[0, vertex, axis] = h
            fd = (loss(verts + e) - loss(verts - e)) / (2 * h)
            analytic = grad[0, vertex, axis]
            assert abs(fd - analytic) <= 0.02 * abs(analytic) + 2e-2, (vertex, axis, fd.item(), analytic.item())
    assert grad[0, 1].norm() > 1.0  # the boundary vertices move the silhouette


def test_colour_gradient_and_float64_round_trip():
    verts, faces = ico_sphere(1, 0.8)
    verts = verts.double()[None]
    cam = camera_looking_at((0.0, 0.0, 0.0), (0.0, 0.5, -2.5), (12, 12), focal=12.0).to(dtype=torch.float64)
    colors = torch.full((1, verts.shape[1], 3), 0.5, dtype=torch.float64, requires_grad=True)
    verts.requires_grad_()
    image = MeshRenderer("shaded", sigma=1e-3, gamma=1e-2)(verts, faces, cam, colors)
    assert image.dtype == torch.float64 and image.shape == (1, 3, 12, 12)
    gc, gv = torch.autograd.grad(image.sum(), (colors, verts))
    assert gc.abs().sum() > 0 and gv.abs().sum() > 0
    # without specular light and on a black background, the image is linear in the vertex colours
    bg = MeshRenderer("shaded", sigma=1e-3, gamma=1e-2, background=(0.0,) * 3, specular=0.0)
    a = bg(verts, faces, cam, colors)
    torch.testing.assert_close(bg(verts, faces, cam, 2 * colors), 2 * a, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    verts, faces = ico_sphere(2, 0.8)
    cam = camera_looking_at((0.0, 0.0, 0.0), (0.5, 0.7, -2.5), (32, 32), focal=40.0)
    r = MeshRenderer("silhouette", sigma=1e-3)
    torch.testing.assert_close(r(verts[None].cuda(), faces.cuda(), cam.to("cuda")).cpu(), r(verts[None], faces, cam),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("case, match", [
    ("verts_shape", r"verts: expected shape \(B, V, 3\)"),
    ("verts_batch", r"verts: expected batch size 1 or 2"),
    ("verts_dtype", r"verts: expected dtype torch.float32"),
    ("verts_nan", r"verts: contains NaN or inf"),
    ("faces_shape", r"faces: expected shape \(F, 3\) or \(B, F, 3\)"),
    ("faces_float", r"faces: expected an integer tensor"),
    ("faces_range", r"faces: expected vertex indices in \[0, 42\)"),
    ("colors_unused", r"colors: only used in shaded mode"),
    ("colors_shape", r"colors: expected shape \(B, V, 3\) with V=42"),
    ("camera", r"camera: expected a renderers.cameras.Camera"),
])
def test_bad_input_raises_value_error(case, match):
    verts, faces = ico_sphere(1)
    cam = Camera.cat([camera_looking_at((0.0, 0.0, 0.0), (0.0, 0.0, -3.0), (8, 8))] * 2)
    sil, shaded = MeshRenderer(), MeshRenderer("shaded")
    v = verts[None]
    calls = {
        "verts_shape": lambda: sil(verts, faces, cam),
        "verts_batch": lambda: sil(v.expand(3, -1, -1), faces, cam),
        "verts_dtype": lambda: sil(v.double(), faces, cam),
        "verts_nan": lambda: sil(v * float("nan"), faces, cam),
        "faces_shape": lambda: sil(v, faces[:, :2], cam),
        "faces_float": lambda: sil(v, faces.float(), cam),
        "faces_range": lambda: sil(v, faces + 1, cam),
        "colors_unused": lambda: sil(v, faces, cam, torch.rand(1, 42, 3)),
        "colors_shape": lambda: shaded(v, faces, cam, torch.rand(1, 40, 3)),
        "camera": lambda: sil(v, faces, None),
    }
    with pytest.raises(ValueError, match=match):
        calls[case]()


# ------------------------------------------------------------------------------------------------------------
# Plato's rasterizer (numba kernels and the pure-torch reference) against PyTorch3D's
def awkward_scene(seed: int, size=(20, 28)) -> tuple[torch.Tensor, torch.Tensor, Camera]:
    """A batch of 2 scenes built in view space and moved to the world by a random camera: an ellipsoid
    (occlusion), small and large triangles, triangles larger than the image, triangles crossing the camera
    plane (z = 0) and triangles wholly behind the camera."""
    g = torch.Generator().manual_seed(seed)
    sphere, sphere_faces = ico_sphere(1, 0.8)
    from renderers.cameras import axis_angle_to_matrix

    turn = axis_angle_to_matrix(torch.randn(1, 3, generator=g))[0]  # no face edge-on by symmetry
    sphere = (sphere * torch.tensor([1.0, 0.7, 1.2])) @ turn.T + torch.tensor([0.2, -0.1, 3.0])
    tris = []
    for scale, n in ((0.05, 12), (0.4, 10), (6.0, 2)):
        centre = torch.cat([(torch.rand(n, 2, generator=g) - 0.5) * 2.0, 1.5 + 3 * torch.rand(n, 1, generator=g)], 1)
        tris.append(centre[:, None] + scale * torch.randn(n, 3, 3, generator=g))
    crossing = torch.cat([torch.randn(4, 3, 2, generator=g), 2.0 + 0.5 * torch.randn(4, 3, 1, generator=g)], 2)
    crossing[:, 0, 2] = -0.5 - torch.rand(4, generator=g)
    behind = torch.cat([torch.randn(3, 3, 2, generator=g), -1.0 - torch.rand(3, 3, 1, generator=g)], 2)
    tris = torch.cat(tris + [crossing, behind]).reshape(-1, 3)
    view = torch.cat([sphere, tris])
    faces = torch.cat([sphere_faces, len(sphere) + torch.arange(len(tris)).reshape(-1, 3)])
    cams = []
    for _ in range(2):
        eye = torch.randn(1, 3, generator=g)
        R, t = look_at(eye, eye + torch.randn(1, 3, generator=g))
        cams.append(Camera.create(R, t, size, focal=float(18 + 10 * torch.rand(1, generator=g))))
    cam = Camera.cat(cams)
    world = torch.einsum("bij,bvi->bvj", cam.R, view[None] - cam.t[:, None])  # x_world = R^T (x_view - t)
    return world, faces, cam


def pytorch3d_fragments(fv, size, blur, K, persp, clip):
    """PyTorch3D's rasterize_meshes on the same NDC face vertices (B, F, 3, 3)."""
    from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
    from pytorch3d.structures import Meshes

    B, F = fv.shape[:2]
    meshes = Meshes(verts=fv.reshape(B, 3 * F, 3), faces=torch.arange(3 * F).reshape(1, F, 3).expand(B, -1, -1))
    return rasterize_meshes(meshes, size, blur, K, perspective_correct=persp, clip_barycentric_coords=clip)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("seed, K, soft, size", [(0, 6, True, (20, 28)), (1, 2, True, (28, 20)),
                                                 (2, 1, False, (20, 28))])
def test_fragments_match_pytorch3d(backend, seed, K, soft, size):
    from renderers.mesh import face_vertices_ndc, rasterize_numba, rasterize_torch

    verts, faces, cam = awkward_scene(seed, size)
    fv = face_vertices_ndc(verts, faces.expand(2, -1, -1), cam)
    blur = 3e-3 if soft else 0.0
    theirs = pytorch3d_fragments(fv, cam.image_size, blur, K, True, soft)
    raster = rasterize_numba if backend == "numba" else rasterize_torch
    ours = raster(fv, cam.image_size, blur, K, True, soft)
    assert (ours[0][..., 0] >= 0).float().mean() > 0.2 and (ours[0] >= 0).sum(-1).max() == K
    assert_same_fragments(ours, theirs)


def by_face(fragments):
    """Fragments with each pixel's slots reordered by face index (empty slots last)."""
    p2f = fragments[0]
    order = torch.where(p2f >= 0, p2f, p2f.max() + 1).argsort(-1)
    return [x.gather(3, order if x.dim() == 4 else order[..., None].expand_as(x)) for x in fragments]


def assert_same_fragments(ours, theirs, atol=2e-5):
    """Same faces in every pixel with the same depths, barycentrics and distances. Where a pixel met more faces
    than it keeps, the order of faces of equal float32 depth rests on float32 rounding (PyTorch3D computes in
    float32, Plato in float64): there the kept faces may differ in those of the last kept depth only."""
    k = ours[0].shape[-1]
    assert (theirs[0][..., k:] == -1).all()
    theirs = [x[:, :, :, :k] for x in theirs]
    differ = (by_face(ours)[0] != by_face(theirs)[0]).any(-1)
    full = (theirs[0] >= 0).all(-1)
    assert (full | ~differ).all(), "faces differ in a pixel that kept fewer faces than it could"
    last = theirs[1][..., -1:]
    for a, b in ((ours, theirs), (theirs, ours)):
        alone = (a[0][..., :, None] != b[0][..., None, :]).all(-1) & (a[0] >= 0)  # faces kept by one side only
        assert ((a[1] - last).abs()[alone] < 1e-5).all(), "a face kept by one side only is not at the last depth"
    assert differ.float().mean() < 0.01
    for x, y in zip(by_face(ours)[1:], by_face(theirs)[1:]):
        torch.testing.assert_close(x[~differ], y[~differ], rtol=0, atol=atol)


def test_ties_in_depth_keep_the_lower_face_index_like_pytorch3d():
    """Five copies of one facing triangle at two depths, K = 3: the kept faces are the nearest by (depth, index)."""
    from renderers.mesh import face_vertices_ndc, rasterize_numba, rasterize_torch

    tri = torch.tensor([[-1.0, -1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 1.0, 0.0]])
    verts = torch.cat([tri + torch.tensor([0.0, 0.0, z]) for z in (0.5, 0.0, 0.5, 0.0, 0.0)])[None]
    faces = torch.arange(15).reshape(5, 3)[None]
    cam = Camera.create(torch.eye(3)[None], torch.tensor([[0.0, 0.0, 3.0]]), (8, 8), focal=6.0)
    fv = face_vertices_ndc(verts, faces, cam)
    theirs = pytorch3d_fragments(fv, (8, 8), 1e-3, 3, True, True)[0]
    assert theirs[0, 4, 4].tolist() == [1, 3, 4]
    for raster in (rasterize_numba, rasterize_torch):
        torch.testing.assert_close(raster(fv, (8, 8), 1e-3, 3, True, True)[0], theirs, rtol=0, atol=0)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode, ortho", [("silhouette", False), ("silhouette", True), ("shaded", True)])
def test_images_and_vertex_gradients_match_pytorch3d(mode, ortho):
    """Images within 1e-4 and vertex gradients within 1e-3 (relative, L2) of PyTorch3D's, on awkward scenes.

    Shaded perspective gradients are checked against the torch backend instead (next test): PyTorch3D's float32
    backward of perspective-corrected, clipped barycentrics is ill-conditioned next to thin faces (its gradient of
    a clipped depth reached 1e8 where the exact one is 1), while its silhouette gradient is not.
    """
    for seed in (3, 4):
        verts, faces, cam = awkward_scene(seed)
        if ortho:
            cam = Camera.create(cam.R, cam.t, cam.image_size, pixel_size=0.15)
        colors = torch.rand(verts.shape[:2] + (3,), generator=torch.Generator().manual_seed(seed))
        images, grads = [], []
        for backend in ("numba", "pytorch3d"):
            r = MeshRenderer(mode, sigma=3e-4, gamma=1e-2, faces_per_pixel=8, backend=backend, znear=1.0, zfar=50.0)
            v = verts.clone().requires_grad_()
            image = r(v, faces, cam, colors if mode == "shaded" else None)
            weights = torch.rand(image.shape, generator=torch.Generator().manual_seed(0))
            images.append(image.detach())
            grads.append(torch.autograd.grad((image * weights).sum(), v)[0])
        assert 0.05 < images[1][:, -1].mean() < 0.9
        torch.testing.assert_close(images[0], images[1], atol=1e-4, rtol=0)
        assert relative_error(grads[0], grads[1]) < 1e-3


@pytest.mark.parametrize("mode", ["silhouette", "shaded"])
def test_numba_and_torch_backends_agree(mode):
    """The numba kernels (analytic backward) against the pure-torch reference (autograd), perspective."""
    verts, faces, cam = awkward_scene(5)
    colors = torch.rand(verts.shape[:2] + (3,), generator=torch.Generator().manual_seed(5))
    images, grads = [], []
    for backend in ("numba", "torch"):
        r = MeshRenderer(mode, sigma=3e-4, gamma=1e-2, faces_per_pixel=8, backend=backend, znear=1.0, zfar=50.0)
        v, c = verts.clone().requires_grad_(), colors.clone().requires_grad_()
        image = r(v, faces, cam, c if mode == "shaded" else None)
        weights = torch.rand(image.shape, generator=torch.Generator().manual_seed(0))
        images.append(image.detach())
        grads.append(torch.autograd.grad((image * weights).sum(), v)[0])
    torch.testing.assert_close(images[0], images[1], atol=1e-5, rtol=0)
    assert relative_error(grads[0], grads[1]) < 1e-4


def test_backend_flag():
    verts, faces = ico_sphere(1)
    cam = camera_looking_at((0.0, 0.0, 0.0), (0.0, 0.0, -3.0), (8, 8))
    assert MeshRenderer().backend == "auto"
    with pytest.raises(ValueError, match="backend: expected one of 'auto', 'numba', 'torch', 'pytorch3d'"):
        MeshRenderer(backend="opengl")
    images = [MeshRenderer(backend=b)(verts[None], faces, cam) for b in ("auto", "numba", "torch", "pytorch3d")]
    for image in images[1:]:
        torch.testing.assert_close(image, images[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("gamma, ortho", [(1e-2, False), (1e-4, False), (1e-3, True)])
def test_numba_phong_blend_matches_pytorch3d_shading_on_the_same_fragments(gamma, ortho):
    """The fused numba Phong shading + softmax blend (analytic backward) against PyTorch3D's phong_shading and
    softmax_rgb_blend (autograd) on one set of fragments: RGBA, and gradients to the vertices (through the
    fragments and the normals) and to the colours."""
    from renderers.mesh import face_vertices_ndc, rasterize_numba

    verts, faces, cam = awkward_scene(6)
    if ortho:
        cam = Camera.create(cam.R, cam.t, cam.image_size, pixel_size=0.15)
    faces = faces.expand(2, -1, -1)
    colors = torch.rand(verts.shape[:2] + (3,), generator=torch.Generator().manual_seed(6))
    r = MeshRenderer("shaded", sigma=3e-4, gamma=gamma, faces_per_pixel=8, znear=1.0, zfar=50.0, alpha=True,
                     light_direction=(0.3, -1.0, 0.4), background=(0.2, 0.5, 0.9))
    results = []
    for backend in ("numba", "torch"):  # "torch": the PyTorch3D shading path
        v, c = verts.clone().requires_grad_(), colors.clone().requires_grad_()
        fragments = rasterize_numba(face_vertices_ndc(v, faces, cam), cam.image_size, r._blur, 8, not ortho, True)
        from pytorch3d.renderer.mesh.rasterizer import Fragments

        image = r._shade(v, faces, c, Fragments(*fragments), cam, backend)
        weights = torch.rand(image.shape, generator=torch.Generator().manual_seed(1))
        results.append((image.detach(), *torch.autograd.grad((image * weights).sum(), (v, c))))
    (a, gva, gca), (b, gvb, gcb) = results
    assert 0.05 < b[:, 3].mean() < 0.9
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # PyTorch3D float32 depths in exp(dz / gamma): ~4e-5
    assert relative_error(gva, gvb) < 1e-4 and relative_error(gca, gcb) < 1e-4
