"""Input checks shared by the renderers: one-line ``ValueError``s naming the argument and what was expected."""

from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(name: str, x, dims: tuple, sizes: dict | None = None, like: Tensor | None = None,
                 finite: bool = True) -> dict:
    """Validate a floating-point tensor against a named shape and return the bound sizes.

    Args:
        name: the argument's name, used in the message.
        x: the value to check.
        dims: expected shape; ints are fixed sizes, strings are symbols (e.g. ``("B", 1, "D", "H", "W")``)
            that must agree with ``sizes`` and with each other.
        sizes: symbols already bound, e.g. ``{"B": 4}``.
        like: if given, ``x`` must have its dtype and device.
        finite: also reject NaN / inf.
    Returns:
        ``sizes`` extended with the symbols bound by ``x``.
    """
    sizes = dict(sizes or {})
    spec = "(" + ", ".join(str(d) for d in dims) + ")"
    known = ", ".join(f"{k}={v}" for k, v in sizes.items() if k in dims)
    want = spec + (f" with {known}" if known else "")
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {want}, got {type(x).__name__}")
    ok = x.dim() == len(dims)
    for d, n in zip(dims, x.shape) if ok else ():
        ok = ok and (d == n if isinstance(d, int) else sizes.setdefault(d, n) == n)
    if not ok:
        raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor of shape {spec}, got dtype {x.dtype}")
    if like is not None and (x.dtype != like.dtype or x.device != like.device):
        raise ValueError(f"{name}: expected dtype {like.dtype} on device {like.device} (matching the camera), "
                         f"got {x.dtype} on {x.device}")
    if finite and x.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
        raise ValueError(f"{name}: contains NaN or inf")  # min / max propagate NaN: one pass, no mask
    return sizes
