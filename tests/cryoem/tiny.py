"""What the command-line tests share: the ``cryoem`` executable, a tiny C-alpha ubiquitin simulation (32 px,
SNR 1) and a few-step run on it."""

import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
BIN = Path(sys.executable).parent


def cryoem(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "cryoem", *map(str, args)], capture_output=True, text=True, **kw)


def simulate_ubiquitin(out: Path, n: int, seed: int) -> Path:
    """``n`` particles of 1UBI's 76 C-alpha atoms at 32 px, 2.5 Å/px, SNR 1 into ``out``."""
    r = cryoem("simulate", "--structure", DATA / "1ubi.pdb", "--atoms", "ca", "--n", n, "--box", 32,
               "--pixel-size", 2.5, "--snr", 1.0, "--seed", seed, "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def train_tiny(sim: Path, out: Path, zdim: int) -> Path:
    """4 training steps of batch 16 on ``sim`` (a C-alpha model, coordinates already centred) into ``out``."""
    r = cryoem("train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms", "ca",
               "--center", "none", "--zdim", zdim, "--steps", 4, "--batch-size", 16, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def star_as_cs(star: Path, path: Path) -> None:
    """A cryoSPARC particles.cs with the metadata of ``star`` (and fields Plato does not read)."""
    import numpy as np
    import starfile
    import torch

    from renderers.cameras import euler_zyz_to_matrix, matrix_to_axis_angle

    b = starfile.read(star)
    p, apix = b["particles"], float(b["optics"]["rlnImagePixelSize"][0])
    n = len(p)
    R = euler_zyz_to_matrix(*(torch.deg2rad(torch.as_tensor(np.array(p[c], dtype=np.float64)))
                              for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    dt = [("uid", "<u8"), ("blob/path", "S32"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
          ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
          ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
          ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)), ("location/micrograph_uid", "<u8")]
    cs = np.zeros(n, dtype=dt)
    cs["uid"] = np.random.default_rng(0).integers(1, 2**63, n, dtype=np.uint64)
    cs["blob/path"] = b"particles.mrcs"
    cs["blob/idx"] = [int(s.split("@")[0]) - 1 for s in p["rlnImageName"]]
    cs["blob/shape"] = int(b["optics"]["rlnImageSize"][0])
    cs["blob/psize_A"] = apix
    cs["ctf/accel_kv"], cs["ctf/cs_mm"] = b["optics"]["rlnVoltage"][0], b["optics"]["rlnSphericalAberration"][0]
    cs["ctf/amp_contrast"] = b["optics"]["rlnAmplitudeContrast"][0]
    cs["ctf/df1_A"], cs["ctf/df2_A"] = p["rlnDefocusU"], p["rlnDefocusV"]
    cs["ctf/df_angle_rad"], cs["ctf/phase_shift_rad"] = np.deg2rad(p["rlnDefocusAngle"]), np.deg2rad(p["rlnPhaseShift"])
    cs["alignments3D/pose"] = matrix_to_axis_angle(R.transpose(1, 2)).numpy()  # cryoSPARC: R = expmap(pose)^T
    cs["alignments3D/shift"] = np.stack([p["rlnOriginXAngst"], p["rlnOriginYAngst"]], 1) / apix  # same sense, px
    cs["location/micrograph_uid"] = np.arange(n) * 7 + 11
    with open(path, "wb") as f:
        np.save(f, cs)
