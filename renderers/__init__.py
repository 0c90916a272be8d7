"""renderers: differentiable image formation, 3D parameters + ``Camera`` -> images (B, C, H, W).

Imports nothing from ``scene3d`` or ``cryoem``.
"""

from renderers.cameras import Camera

__all__ = ["Camera"]
