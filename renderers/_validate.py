"""The one tensor validator of Plato's renderers: one-line ``ValueError``s naming the argument and what was expected.

``Camera``, the Gaussian projector and the voxel, mesh, NeRF and GQN renderers all check their tensor
arguments with :func:`check_tensor`, so every message has the same form, for example::

    t: expected shape (B, 3) with B=1, got (2, 3)
    centers: expected shape (N, 3) or (B, N, 3), got (5, 2)
    density: expected dtype torch.float32 on device cpu (matching the camera), got torch.float64 on cpu
    R: contains NaN or inf
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bind(dims: tuple, shape: tuple, sizes: dict) -> dict | None:
    """``sizes`` extended with the symbols of ``dims`` bound by ``shape``, or None if ``shape`` does not fit."""
    if len(dims) != len(shape):
        return None
    bound = dict(sizes)
    for d, n in zip(dims, shape):
        if (d != n) if isinstance(d, int) else (bound.setdefault(d, n) != n):
            return None
    return bound


def check_tensor(name: str, x, dims: tuple | list[tuple], sizes: dict | None = None, like: Tensor | None = None,
                 finite: bool = True, like_name: str = "the camera") -> dict:
    """Validate a floating-point tensor against a named shape and return the bound sizes.

    Args:
        name: the argument's name, used in the message.
        x: the value to check.
        dims: expected shape; ints are fixed sizes, strings are symbols (e.g. ``("B", 1, "D", "H", "W")``)
            that must agree with ``sizes`` and with each other. A list of such tuples accepts any one
            of them (the first that fits binds the symbols), e.g. ``[("N", 3), ("B", "N", 3)]``.
        sizes: symbols already bound, e.g. ``{"B": 4}``.
        like: if given, ``x`` must have its dtype and device.
        finite: also reject NaN / inf.
        like_name: what ``like`` is, for the message.
    Returns:
        ``sizes`` extended with the symbols bound by ``x``.
    """
    sizes = dict(sizes or {})
    options = dims if isinstance(dims, list) else [dims]
    spec = " or ".join("(" + ", ".join(str(d) for d in o) + ("," if len(o) == 1 else "") + ")" for o in options)
    known = ", ".join(f"{k}={v}" for k, v in sizes.items() if any(k in o for o in options))
    want = spec + (f" with {known}" if known else "")
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {want}, got {type(x).__name__}")
    bound = next((b for b in (_bind(tuple(o), tuple(x.shape), sizes) for o in options) if b is not None), None)
    if bound is None:
        raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor of shape {spec}, got dtype {x.dtype}")
    if like is not None and (x.dtype != like.dtype or x.device != like.device):
        raise ValueError(f"{name}: expected dtype {like.dtype} on device {like.device} (matching {like_name}), "
                         f"got {x.dtype} on {x.device}")
    if finite and x.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
        raise ValueError(f"{name}: contains NaN or inf")  # min / max propagate NaN: one pass, no mask
    return bound
