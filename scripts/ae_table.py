"""One markdown table of the scene autoencoders beside GQN, from the runs' metrics.json (issue 7).

    python scripts/ae_table.py --voxel runs/voxel-ae --mesh runs/mesh-ae --nerf runs/nerf-ae --gqn runs/gqn-sm7

Autoencoder runs hold ``scene3d eval`` output (``{"1": {...}, "3": {...}, "visual_hull_3_views": {...}}``);
the GQN run holds ``scene3d eval``'s GQN report (``metrics[k]["gqn"]``). A missing run or metric prints "-".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLS = ("psnr", "masked_psnr", "ssim", "iou", "chamfer")


def rows(name: str, run: str | None, contexts) -> list[str]:
    p = Path(run) / "metrics.json" if run else None
    if p is None or not p.is_file():
        return [f"| {name} | {k} | " + " | ".join("-" for _ in COLS) + " |" for k in contexts]
    m = json.loads(p.read_text())
    out = []
    for k in contexts:
        r = m.get("metrics", {}).get(str(k), {}).get("gqn") if name == "GQN" else m.get(str(k))
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
    for name, run in (("VoxelAE", a.voxel), ("MeshAE", a.mesh), ("NeRF-AE", a.nerf), ("GQN", a.gqn)):
        for line in rows(name, run, a.contexts):
            if line.startswith("| visual hull"):
                if seen_hull:
                    continue
                seen_hull = True
            print(line)


if __name__ == "__main__":
    main()
