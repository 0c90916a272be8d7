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


@numba.njit(cache=True, nogil=True, inline="always")
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


@numba.njit(cache=True, nogil=True)
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


@numba.njit(cache=True, nogil=True)
def splat_backward(uv: np.ndarray, width: np.ndarray, weight: np.ndarray, tail: float, grad: np.ndarray,
                   grad_uv: np.ndarray, grad_weight: np.ndarray) -> None:
    """Gradients of ``sum(grad * image)`` with respect to ``uv`` (into ``grad_uv`` (B, N, 2)) and ``weight``
    (into ``grad_weight`` (B, N)), for the upstream gradient ``grad`` (B, H, W): one pass over the windows."""
    B, N = weight.shape
    H, W = grad.shape[1], grad.shape[2]
    K = window_size(width, tail)
    for b in range(B):
        X, dX, Y, dY = np.empty(K), np.empty(K), np.empty(K), np.empty(K)
        for n in range(N):
            x0, nx = _window(uv[b, n, 0], width[b, n, 0], tail, W, X, dX, True)
            y0, ny = _window(uv[b, n, 1], width[b, n, 1], tail, H, Y, dY, True)
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
                            out_jvp[b, y0 + i, x0 + j, k] += du * tangents[b, n, k, 0] + dv * tangents[b, n, k, 1]
