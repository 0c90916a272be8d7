"""One markdown table of the scene autoencoders beside GQN, from the runs' metrics.json (issue 7).

    python scripts/ae_table.py --voxel runs/voxel-ae --mesh runs/mesh-ae --nerf runs/nerf-ae --gqn runs/gqn-sm7

Autoencoder runs hold ``scene3d eval`` output (``{"1": {...}, "3": {...}, "visual_hull_3_views": {...}}``).
GQN rows come from the first autoencoder run evaluated with ``--with-gqn`` (the same views); without one,
from ``--gqn``'s own ``scene3d eval`` report (``metrics[k]["gqn"]``, its own random views). A missing run
or metric prints "-".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLS = ("psnr", "masked_psnr", "ssim", "iou", "chamfer")


def load(run: str | None) -> dict | None:
    p = Path(run) / "metrics.json" if run else None
    return json.loads(p.read_text()) if p is not None and p.is_file() else None


def rows(name: str, m: dict | None, contexts) -> list[str]:
    if m is None:
        return [f"| {name} | {k} | " + " | ".join("-" for _ in COLS) + " |" for k in contexts]
    out = []
    for k in contexts:
        r = m.get("metrics", {}).get(str(k), {}).get("gqn") if "metrics" in m else m.get(str(k))
        r = r or {}
        out.append(f"| {name} | {k} | " + " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in COLS) + " |")
    if "visual_hull_3_views" in m:
        out.append("| visual hull (3 views) | 3 | - | - | - | "
                   f"{m['visual_hull_3_views']['iou']:.3f} | - |")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("voxel", "mesh", "nerf", "gqn"):
        p.add_argument(f"--{name}", default=None)
    p.add_argument("--contexts", type=int, nargs="+", default=[1, 3])
    a = p.parse_args(argv)
    print("| model | k | PSNR | masked PSNR | SSIM | IoU 32³ | Chamfer |")
    print("|---|---|---|---|---|---|---|")
    seen_hull = False
    aes = [load(r) for r in (a.voxel, a.mesh, a.nerf)]
    gqn = next((m["gqn"] for m in aes if m and "gqn" in m), None) or load(a.gqn)
    for name, m in zip(("VoxelAE", "MeshAE", "NeRF-AE", "GQN"), (*aes, gqn)):
        for line in rows(name, m, a.contexts):
            if line.startswith("| visual hull"):
                if seen_hull:
                    continue
                seen_hull = True
            print(line)


if __name__ == "__main__":
    main()
