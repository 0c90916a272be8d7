"""The one tensor validator: every renderer's bad-input message names the argument, the shape and the sizes."""

import re

import pytest
import torch

from renderers._validate import check_tensor
from renderers.cameras import Camera
from renderers.gaussian import gaussian_density_map, gaussian_projection


def _raises(fn, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        fn()


def test_check_tensor_binds_symbols_and_accepts_alternatives():
    assert check_tensor("x", torch.zeros(2, 5, 3), ("B", "N", 3)) == {"B": 2, "N": 5}
    assert check_tensor("x", torch.zeros(5, 3), [("N", 3), ("B", "N", 3)]) == {"N": 5}
    assert check_tensor("x", torch.zeros(2, 5, 3), [("N", 3), ("B", "N", 3)], {"N": 5}) == {"N": 5, "B": 2}
    _raises(lambda: check_tensor("x", torch.zeros(2, 4), ("B", "B")), "x: expected shape (B, B), got (2, 4)")
    _raises(lambda: check_tensor("x", torch.zeros(3), [("N",), ("B", "N")], {"B": 2, "N": 4}),
            "x: expected shape (N,) or (B, N) with B=2, N=4, got (3,)")
    _raises(lambda: check_tensor("x", [1.0], ("N",)), "x: expected a torch.Tensor of shape (N,), got list")
    _raises(lambda: check_tensor("x", torch.zeros(3, dtype=torch.int64), ("N",)),
            "x: expected a floating-point tensor of shape (N,), got dtype torch.int64")
    _raises(lambda: check_tensor("x", torch.tensor([0.0, float("inf")]), ("N",)), "x: contains NaN or inf")
    _raises(lambda: check_tensor("x", torch.zeros(3), ("N",), like=torch.zeros(1, dtype=torch.float64),
                                 like_name="origins"),
            "x: expected dtype torch.float64 on device cpu (matching origins), got torch.float32 on cpu")


def test_camera_messages_name_the_batch_size():
    R = torch.eye(3)[None]
    _raises(lambda: Camera.create(R, torch.zeros(2, 3), (8, 8), fov=1.0),
            "t: expected shape (B, 3) with B=1, got (2, 3)")
    cam = Camera.create(R, torch.zeros(1, 3), (8, 8), fov=1.0)
    _raises(lambda: cam.project(torch.zeros(2, 4, 3)), "points: expected shape (B, N, 3) with B=1, got (2, 4, 3)")
    _raises(lambda: Camera.from_pose(R, torch.zeros(1, 3), 1.0, 8), "shift_A: expected shape (B, 2), got (1, 3)")


def test_gaussian_messages_list_both_centre_layouts():
    cam = Camera.from_pose(torch.eye(3)[None].expand(2, 3, 3), torch.zeros(2, 2), 1.0, 8)
    c = torch.zeros(5, 3)
    _raises(lambda: gaussian_projection(torch.zeros(5, 2), 1.0, 1.0, cam),
            "centers: expected shape (N, 3) or (B, N, 3), got (5, 2)")
    _raises(lambda: gaussian_projection(c, torch.ones(4), 1.0, cam),
            "amplitudes: expected shape (N,) or (B, N) with B=2, N=5, got (4,)")
    _raises(lambda: gaussian_projection(c.double(), 1.0, 1.0, cam),
            "centers: expected dtype torch.float32 on device cpu (matching the camera), got torch.float64 on cpu")
    _raises(lambda: gaussian_density_map(torch.zeros(5), 1.0, 1.0, 4, 1.0),
            "centers: expected shape (N, 3) or (B, N, 3), got (5,)")
