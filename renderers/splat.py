"""Compiled CPU kernels (numba) of the windowed splat behind :func:`renderers.gaussian.gaussian_projection`.

Gaussian ``n`` of image ``b`` has its centre ``uv[b, n] = (u, v)`` in continuous pixel coordinates (pixel ``j``
spans ``[j, j + 1)``, x = column, y = row), widths ``width[b, n] = (s_x, s_y)`` in pixels and a weight
``a = weight[b, n]``. It adds to pixel ``(i, j)``

    a * Y_i * X_j,   X_j = erf((j + 1 - u) / (sqrt(2) s_x)) - erf((j - u) / (sqrt(2) s_x))

(``Y_i`` likewise along rows), which is twice the 1-D mass fraction per axis, as in ``gaussian._cdf_steps``.
Only the cells that meet ``[u - tail s, u + tail s]`` and lie inside the image are evaluated (the mass beyond
``tail`` widths is below the working precision), so a Gaussian costs about ``(2 tail s_x + 1) (2 tail s_y + 1)``
multiply-adds and ``2 tail (s_x + s_y) + 4`` erf calls, whatever the image size. Arithmetic is float64 for
every input dtype; images are accumulated in the output's dtype.

Each kernel runs on its calling thread; ``renderers.gaussian`` calls them on slices of the batch from a pool of
Python threads, one per torch thread (they release the GIL). Measured: numba's own OpenMP pool, even when told
to use one thread, kept a second core busy (1.7 CPU-seconds per second), so two single-thread training runs
on a 2-core machine each ran at half speed.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_DPDF = 2.0 / math.sqrt(math.pi)  # d erf(z) / dz = _DPDF exp(-z^2)


@numba.njit(cache=True, nogil=True)
def window_size(width: np.ndarray, tail: float) -> int:
    """The most cells that any window of ``width`` (B, N, 2) pixels meets."""
    return int(math.floor(2.0 * tail * width.max())) + 2


# Abramowitz & Stegun 7.1.28: erf(x) = 1 - (1 + a1 x + ... + a6 x^6)^-16 for x >= 0, |error| <= 3e-7
_AS = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)


@numba.njit(cache=True, nogil=True, inline="always", fastmath=True)
def erf_fast(x: float) -> float:
    """erf to 3e-7 (absolute) without a transcendental call, for float32 images (their precision is 6e-8
    relative to the pixel, and every pixel sums several differences): ~3x cheaper than ``math.erf``."""
    a = abs(x)
    p = 1.0 + a * (_AS[0] + a * (_AS[1] + a * (_AS[2] + a * (_AS[3] + a * (_AS[4] + a * _AS[5])))))
    p2 = p * p
    p4 = p2 * p2
    p8 = p4 * p4
    e = 1.0 - 1.0 / (p8 * p8)
    return e if x >= 0.0 else -e


@numba.njit(cache=True, nogil=True, fastmath=True)
def _window(u: float, s: float, tail: float, n: int, vals: np.ndarray, dvals: np.ndarray, deriv: bool,
            fast: bool = False) -> tuple[int, int]:
    """Erf differences of one 1-D Gaussian (centre ``u``, width ``s`` px) on its cells inside ``[0, n)``.

    Writes ``vals[k]`` for cells ``lo + k``, k < count, and with ``deriv`` their derivatives with respect to
    ``u`` into ``dvals``; returns ``(lo, count)`` (count 0: the window misses the image). ``fast``: the values
    with :func:`erf_fast` (float32 images).
    """
    r = tail * s
    if u + r <= 0.0 or u - r >= n:
        return 0, 0
    lo = int(max(math.floor(u - r), 0.0))
    hi = int(min(math.floor(u + r) + 1.0, float(n)))
    inv = _SQRT1_2 / s
    z = (lo - u) * inv
    cdf = erf_fast(z) if fast else math.erf(z)
    pdf = math.exp(-z * z) if deriv else 0.0
    for k in range(hi - lo):
        z = (lo + k + 1 - u) * inv
        c = erf_fast(z) if fast else math.erf(z)
        vals[k] = c - cdf
        cdf = c
        if deriv:
            p = math.exp(-z * z)
            dvals[k] = -_DPDF * inv * (p - pdf)  # d/du of erf((e - u) inv) = -_DPDF inv exp(-z^2)
            pdf = p
    return lo, hi - lo


def splat_forward(uv: np.ndarray, width: np.ndarray, weight: np.ndarray, tail: float, out: np.ndarray,
                  fast: bool = False) -> None:
    """Add every Gaussian's window into ``out`` (B, H, W), zeroed by the caller; see the module docstring.
    ``fast``: erf values from :func:`erf_fast` (for float32 images). :func:`splat_jvp` with no directions."""
    B, N = weight.shape
    splat_jvp(uv, width, weight, np.zeros((B, N, 0, 2)), tail, out, np.zeros((B, 1, 1, 0), out.dtype), fast)


@numba.njit(cache=True, nogil=True, inline="always")
def _pull(grad: np.ndarray, b: int, x0: int, nx: int, X: np.ndarray, dX: np.ndarray, y0: int, ny: int,
          Y: np.ndarray, dY: np.ndarray) -> tuple[float, float, float]:
    """``sum(grad[b] * window)`` of one unit-weight window and its derivatives along u and v."""
    s = su = sv = 0.0
    for i in range(ny):
        gx = gdx = 0.0
        for j in range(nx):
            g = grad[b, y0 + i, x0 + j]
            gx += g * X[j]
            gdx += g * dX[j]
        s += Y[i] * gx
        su += Y[i] * gdx
        sv += dY[i] * gx
    return s, su, sv


@numba.njit(cache=True, nogil=True)
def splat_backward(uv: np.ndarray, width: np.ndarray, weight: np.ndarray, tail: float, grad: np.ndarray,
                   grad_uv: np.ndarray, grad_weight: np.ndarray, fast: bool = False) -> None:
    """Gradients of ``sum(grad * image)`` with respect to ``uv`` (into ``grad_uv`` (B, N, 2)) and ``weight``
    (into ``grad_weight`` (B, N)), for the upstream gradient ``grad`` (B, H, W): one pass over the windows.
    ``fast``: the erf values from :func:`erf_fast` (float32 images)."""
    B, N = weight.shape
    H, W = grad.shape[1], grad.shape[2]
    K = window_size(width, tail)
    for b in range(B):
        X, dX, Y, dY = np.empty(K), np.empty(K), np.empty(K), np.empty(K)
        for n in range(N):
            x0, nx = _window(uv[b, n, 0], width[b, n, 0], tail, W, X, dX, True, fast)
            y0, ny = _window(uv[b, n, 1], width[b, n, 1], tail, H, Y, dY, True, fast)
            s, su, sv = _pull(grad, b, x0, nx, X, dX, y0, ny, Y, dY)
            a = weight[b, n]
            grad_weight[b, n] = s
            grad_uv[b, n, 0] = a * su
            grad_uv[b, n, 1] = a * sv


@numba.njit(cache=True, nogil=True)
def splat_jvp(uv: np.ndarray, width: np.ndarray, weight: np.ndarray, tangents: np.ndarray, tail: float,
              out: np.ndarray, out_jvp: np.ndarray, fast: bool = False) -> None:
    """The images of :func:`splat_forward` (into ``out`` (B, H, W)) and, in the same pass over the windows, their
    derivatives along K directions of the centres (into ``out_jvp`` (B, H, W, K)), both zeroed by the caller.

    ``tangents`` (B, N, K, 2): d uv / d eps_k, pixels per unit. Pixel (i, j) of Gaussian n gains
    ``a Y_i X_j`` in the image and ``a (Y_i dX_j t_k,u + dY_i X_j t_k,v)`` in derivative k: one window's erf and
    exp values serve the image and all K derivatives (K + 1 separate renderings evaluate them K + 1 times).
    """
    B, N = weight.shape
    H, W = out.shape[1], out.shape[2]
    K = tangents.shape[2]
    deriv = K > 0
    C = window_size(width, tail)
    for b in range(B):
        X, dX, Y, dY = np.empty(C), np.empty(C), np.empty(C), np.empty(C)
        for n in range(N):
            a = weight[b, n]
            if a == 0.0:
                continue
            x0, nx = _window(uv[b, n, 0], width[b, n, 0], tail, W, X, dX, deriv, fast)
            y0, ny = _window(uv[b, n, 1], width[b, n, 1], tail, H, Y, dY, deriv, fast)
            _push(out, out_jvp, b, a, x0, nx, X, dX, y0, ny, Y, dY, tangents[b, n], deriv)


@numba.njit(cache=True, nogil=True, inline="always")
def _push(out: np.ndarray, out_jvp: np.ndarray, b: int, a: float, x0: int, nx: int, X: np.ndarray, dX: np.ndarray,
          y0: int, ny: int, Y: np.ndarray, dY: np.ndarray, t: np.ndarray, deriv: bool) -> None:
    """Add one window of weight ``a`` to image ``b`` and, with ``deriv``, its derivatives along the K pixel
    displacements ``t`` (K, 2) of its centre to ``out_jvp``."""
    K = t.shape[0]
    for i in range(ny):
        ay = a * Y[i]
        for j in range(nx):
            out[b, y0 + i, x0 + j] += ay * X[j]
        if deriv:
            ady = a * dY[i]
            for j in range(nx):
                du = ay * dX[j]
                dv = ady * X[j]
                for k in range(K):
                    out_jvp[b, y0 + i, x0 + j, k] += du * t[k, 0] + dv * t[k, 1]


# ------------------------------------------------------------------ Gaussians that move with affine units
# Gaussian n belongs to unit ``unit[n]`` and has reference position p = ``points[n]`` (3,). In image b it sits at
# world position x = ``maps[b, unit[n]] @ (p, 1)`` and pixel coordinates ``proj[b] @ (x, 1)`` (``proj`` (B, 2, 4):
# the camera's affine map); ``tmaps[b, k, unit[n]] @ (p, 1)`` is its world displacement along direction k.
# Its widths are ``sigma[n] * focal[b]`` pixels and its weight ``amp[n] * scale[b]``. The maps are U x 12 numbers
# per image where the centres would be N x 3 (and N x K x 3 tangents): a model that moves atoms by residues or
# rigid blocks need never build per-atom arrays, and the kernels place each Gaussian on the fly.


@numba.njit(cache=True, nogil=True, inline="always")
def _affine(m: np.ndarray, b: int, u: int, row: int, x: float, y: float, z: float) -> float:
    """Row ``row`` of ``m[b, u]`` applied to (x, y, z, 1); scalar indexing (views cost more here)."""
    return m[b, u, row, 0] * x + m[b, u, row, 1] * y + m[b, u, row, 2] * z + m[b, u, row, 3]


@numba.njit(cache=True, nogil=True, inline="always")
def _linear(m: np.ndarray, b: int, k: int, u: int, row: int, x: float, y: float, z: float) -> float:
    """Row ``row`` of ``m[b, k, u]`` applied to (x, y, z, 1)."""
    return m[b, k, u, row, 0] * x + m[b, k, u, row, 1] * y + m[b, k, u, row, 2] * z + m[b, k, u, row, 3]


@numba.njit(cache=True, nogil=True)
def units_jvp(points: np.ndarray, unit: np.ndarray, maps: np.ndarray, tmaps: np.ndarray, proj: np.ndarray,
              sigma: np.ndarray, amp: np.ndarray, focal: np.ndarray, scale: np.ndarray, tail: float,
              out: np.ndarray, out_jvp: np.ndarray, fast: bool = False) -> None:
    """:func:`splat_jvp` of Gaussians placed by unit maps (see above): ``maps`` (B, U, 3, 4), ``tmaps``
    (B, K, U, 3, 4) (K may be 0), ``proj`` (B, 2, 4), ``focal`` (B, 2) pixels per world unit, ``scale`` (B,);
    images into ``out`` (B, H, W) and derivatives into ``out_jvp`` (B, H, W, K), zeroed by the caller."""
    B, N = maps.shape[0], points.shape[0]
    H, W = out.shape[1], out.shape[2]
    K = tmaps.shape[1]
    deriv = K > 0
    C = int(math.floor(2.0 * tail * sigma.max() * focal.max())) + 2
    X, dX, Y, dY = np.empty(C), np.empty(C), np.empty(C), np.empty(C)
    t = np.empty((K, 2))
    for b in range(B):
        fx, fy, sb = focal[b, 0], focal[b, 1], scale[b]
        p00, p01, p02, p03 = proj[b, 0, 0], proj[b, 0, 1], proj[b, 0, 2], proj[b, 0, 3]
        p10, p11, p12, p13 = proj[b, 1, 0], proj[b, 1, 1], proj[b, 1, 2], proj[b, 1, 3]
        for n in range(N):
            a = amp[n] * sb
            if a == 0.0:
                continue
            u, x, y, z = unit[n], points[n, 0], points[n, 1], points[n, 2]
            wx, wy, wz = (_affine(maps, b, u, 0, x, y, z), _affine(maps, b, u, 1, x, y, z),
                          _affine(maps, b, u, 2, x, y, z))
            x0, nx = _window(p00 * wx + p01 * wy + p02 * wz + p03, sigma[n] * fx, tail, W, X, dX, deriv, fast)
            y0, ny = _window(p10 * wx + p11 * wy + p12 * wz + p13, sigma[n] * fy, tail, H, Y, dY, deriv, fast)
            for k in range(K):
                dx = _linear(tmaps, b, k, u, 0, x, y, z)
                dy = _linear(tmaps, b, k, u, 1, x, y, z)
                dz = _linear(tmaps, b, k, u, 2, x, y, z)
                t[k, 0] = p00 * dx + p01 * dy + p02 * dz
                t[k, 1] = p10 * dx + p11 * dy + p12 * dz
            _push(out, out_jvp, b, a, x0, nx, X, dX, y0, ny, Y, dY, t, deriv)


@numba.njit(cache=True, nogil=True)
def units_backward(points: np.ndarray, unit: np.ndarray, maps: np.ndarray, proj: np.ndarray, sigma: np.ndarray,
                   amp: np.ndarray, focal: np.ndarray, scale: np.ndarray, tail: float, grad: np.ndarray,
                   grad_maps: np.ndarray, grad_proj: np.ndarray, fast: bool = False) -> None:
    """Gradients of ``sum(grad * image)`` of :func:`units_jvp`'s images with respect to ``maps`` and ``proj``,
    added into ``grad_maps`` (B, U, 3, 4) and ``grad_proj`` (B, 2, 4) (zeroed by the caller), for the upstream
    gradient ``grad`` (B, H, W). ``fast``: the erf values from :func:`erf_fast` (float32 images)."""
    B, N = maps.shape[0], points.shape[0]
    H, W = grad.shape[1], grad.shape[2]
    C = int(math.floor(2.0 * tail * sigma.max() * focal.max())) + 2
    X, dX, Y, dY = np.empty(C), np.empty(C), np.empty(C), np.empty(C)
    for b in range(B):
        fx, fy, sb = focal[b, 0], focal[b, 1], scale[b]
        for n in range(N):
            a = amp[n] * sb
            u, x, y, z = unit[n], points[n, 0], points[n, 1], points[n, 2]
            wx, wy, wz = (_affine(maps, b, u, 0, x, y, z), _affine(maps, b, u, 1, x, y, z),
                          _affine(maps, b, u, 2, x, y, z))
            px = proj[b, 0, 0] * wx + proj[b, 0, 1] * wy + proj[b, 0, 2] * wz + proj[b, 0, 3]
            py = proj[b, 1, 0] * wx + proj[b, 1, 1] * wy + proj[b, 1, 2] * wz + proj[b, 1, 3]
            x0, nx = _window(px, sigma[n] * fx, tail, W, X, dX, True, fast)
            y0, ny = _window(py, sigma[n] * fy, tail, H, Y, dY, True, fast)
            _, su, sv = _pull(grad, b, x0, nx, X, dX, y0, ny, Y, dY)
            gu, gv = a * su, a * sv  # d loss / d (u, v) pixels
            for r in range(3):  # d loss / d world row r, then its outer product with (p, 1)
                g = proj[b, 0, r] * gu + proj[b, 1, r] * gv
                grad_maps[b, u, r, 0] += g * x
                grad_maps[b, u, r, 1] += g * y
                grad_maps[b, u, r, 2] += g * z
                grad_maps[b, u, r, 3] += g
            grad_proj[b, 0, 0] += gu * wx
            grad_proj[b, 0, 1] += gu * wy
            grad_proj[b, 0, 2] += gu * wz
            grad_proj[b, 0, 3] += gu
            grad_proj[b, 1, 0] += gv * wx
            grad_proj[b, 1, 1] += gv * wy
            grad_proj[b, 1, 2] += gv * wz
            grad_proj[b, 1, 3] += gv
