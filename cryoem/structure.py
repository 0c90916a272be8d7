"""Atomic models: reading (PDB / mmCIF via biopython), selections, scattering, bonds, superposition.

Coordinates are in Å. A ``Structure`` holds ``M`` models (an ensemble; 1 for a
single model) of the same ``N`` atoms. Per-atom annotations are numpy arrays of
length N. Atoms are identified across files by ``(chain, resnum, icode, name)``.

Electron scattering (choice stated once, here)
----------------------------------------------
Each atom is modelled by the 5-Gaussian elastic electron scattering factor of
Peng, Ren, Dudarev & Whelan (1996), Acta Cryst. A52, 257, Table 1 (neutral atoms,
0 < s < 2 Å^-1): ``f(s) = sum_i a_i exp(-b_i s^2)`` with ``s = q / 2``. Its real-space
potential is a sum of 3D Gaussians with masses ``a_i`` and variances
``(b_i + B) / (8 pi^2)`` Å^2, where ``B`` is an extra B-factor. ``scattering_gaussians``
returns either those 5 Gaussians per atom or one moment-matched Gaussian per atom
(mass ``f(0) = sum a_i``, variance ``sum a_i (b_i + B) / (8 pi^2 f(0))``), which is
5x cheaper and what the simulator and the atom VAE use by default.

C-alpha-only models use one pseudo-atom per residue: mass = the summed ``f(0)``
of the residue's heavy atoms; variance = the mean squared distance of those
atoms from C-alpha / 3 (per axis), measured on 3O21, 6FLR and 1UBI (medians),
plus the single-Gaussian carbon variance and ``B``.
"""

from __future__ import annotations

import gzip
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from plato_core.runinfo import UserError, atomic_write

__all__ = ["Structure", "read_structure", "example_structure", "write_pdb", "write_cif", "scattering_gaussians",
           "bonded_pairs", "kabsch", "superpose", "rmsd", "match_atoms", "PENG_1996"]

# Peng et al. 1996, Table 1: element -> (a_1..a_5 [Å], b_1..b_5 [Å^2])
PENG_1996: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "H": ((0.0349, 0.1201, 0.1970, 0.0573, 0.1195), (0.5347, 3.5867, 12.3471, 18.9525, 38.6269)),
    "C": ((0.0893, 0.2563, 0.7570, 1.0487, 0.3575), (0.2465, 1.7100, 6.4094, 18.6113, 50.2523)),
    "N": ((0.1022, 0.3219, 0.7982, 0.8197, 0.1715), (0.2451, 1.7481, 6.1925, 17.3894, 48.1431)),
    "O": ((0.0974, 0.2921, 0.6910, 0.6990, 0.2039), (0.2067, 1.3815, 4.6943, 12.7105, 32.4726)),
    "F": ((0.1083, 0.3175, 0.6487, 0.5846, 0.1421), (0.2057, 1.3439, 4.2788, 11.3932, 28.7881)),
    "NA": ((0.2142, 0.6853, 0.7692, 1.6589, 1.4482), (0.3334, 2.3446, 10.0830, 48.3037, 138.2700)),
    "MG": ((0.2314, 0.6866, 0.9677, 2.1882, 1.1339), (0.3278, 2.2720, 10.9241, 39.2898, 101.9748)),
    "P": ((0.2548, 0.6106, 1.4541, 2.3204, 0.8477), (0.2908, 1.8740, 8.5176, 24.3434, 63.2996)),
    "S": ((0.2497, 0.5628, 1.3899, 2.1865, 0.7715), (0.2681, 1.6711, 7.0267, 19.5377, 50.3888)),
    "CL": ((0.2443, 0.5397, 1.3919, 2.0197, 0.6621), (0.2468, 1.5242, 6.1537, 16.6687, 42.3086)),
    "CA": ((0.4054, 1.3880, 2.1602, 3.7532, 2.2063), (0.3499, 3.0991, 11.9608, 53.9353, 142.3892)),
    "MN": ((0.3796, 1.2094, 1.7815, 2.5420, 1.5937), (0.2699, 2.0455, 7.4726, 31.0604, 91.5622)),
    "FE": ((0.3946, 1.2725, 1.7031, 2.3140, 1.4795), (0.2717, 2.0443, 7.6007, 29.9714, 86.2265)),
    "ZN": ((0.4288, 1.2646, 1.4472, 1.8294, 1.0934), (0.2593, 1.7998, 6.7500, 25.5860, 73.5284)),
}

# residue -> (heavy-atom composition, median mean squared distance of heavy atoms from CA [Å^2])
RESIDUES: dict[str, tuple[dict[str, int], float]] = {
    "ALA": ({"C": 3, "N": 1, "O": 1}, 2.51), "ARG": ({"C": 6, "N": 4, "O": 1}, 14.15),
    "ASN": ({"C": 4, "N": 2, "O": 2}, 5.08), "ASP": ({"C": 4, "N": 1, "O": 3}, 5.04),
    "CYS": ({"C": 3, "N": 1, "O": 1, "S": 1}, 3.37), "GLN": ({"C": 5, "N": 2, "O": 2}, 8.44),
    "GLU": ({"C": 5, "N": 1, "O": 3}, 8.35), "GLY": ({"C": 2, "N": 1, "O": 1}, 2.53),
    "HIS": ({"C": 6, "N": 3, "O": 1}, 8.26), "ILE": ({"C": 6, "N": 1, "O": 1}, 5.02),
    "LEU": ({"C": 6, "N": 1, "O": 1}, 5.52), "LYS": ({"C": 6, "N": 2, "O": 1}, 10.14),
    "MET": ({"C": 5, "N": 1, "O": 1, "S": 1}, 7.09), "PHE": ({"C": 9, "N": 1, "O": 1}, 9.98),
    "PRO": ({"C": 5, "N": 1, "O": 1}, 3.48), "SER": ({"C": 3, "N": 1, "O": 2}, 3.08),
    "THR": ({"C": 4, "N": 1, "O": 2}, 3.56), "TRP": ({"C": 11, "N": 2, "O": 1}, 15.50),
    "TYR": ({"C": 9, "N": 1, "O": 2}, 12.66), "VAL": ({"C": 5, "N": 1, "O": 1}, 3.62),
}

# covalent radii (Å), Cordero et al. 2008; bonded when d < r_i + r_j + BOND_TOLERANCE
COVALENT_RADII = {"H": 0.31, "C": 0.76, "N": 0.71, "O": 0.66, "F": 0.57, "P": 1.07, "S": 1.05, "CL": 1.02,
                  "SE": 1.20, "BR": 1.20, "I": 1.39}
BOND_TOLERANCE = 0.45
CA_CA_MAX = 4.2  # consecutive C-alpha: 3.8 Å trans, 2.9 Å cis; larger means a chain break
BACKBONE = ("N", "CA", "C", "O")
WATER = ("HOH", "WAT", "DOD", "H2O")


@dataclass
class Structure:
    """An ensemble of M models of the same N atoms.

    Attributes:
        coords: (M, N, 3) float64, Å.
        element, name, resname, chain, icode: (N,) str arrays (element upper-case).
        resnum: (N,) int array.
        bfactor: (N,) float array (Å^2), from the file (0 when absent).
    """

    coords: np.ndarray
    element: np.ndarray
    name: np.ndarray
    resname: np.ndarray
    resnum: np.ndarray
    chain: np.ndarray
    icode: np.ndarray = field(default=None)
    bfactor: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.float64)
        if self.coords.ndim == 2:
            self.coords = self.coords[None]
        N = self.coords.shape[1]
        if self.coords.ndim != 3 or self.coords.shape[2] != 3:
            raise ValueError(f"coords: expected shape (M, N, 3), got {self.coords.shape}")
        if self.icode is None:
            self.icode = np.full(N, "", dtype=object)
        if self.bfactor is None:
            self.bfactor = np.zeros(N)
        for k in ("element", "name", "resname", "resnum", "chain", "icode", "bfactor"):
            v = np.asarray(getattr(self, k))
            if v.shape != (N,):
                raise ValueError(f"{k}: expected shape ({N},), got {v.shape}")
            setattr(self, k, v)

    @property
    def n_models(self) -> int:
        return self.coords.shape[0]

    @property
    def n_atoms(self) -> int:
        return self.coords.shape[1]

    def __len__(self) -> int:
        return self.n_atoms

    def keys(self) -> list[tuple]:
        """Per-atom identity ``(chain, resnum, icode, name)``."""
        return list(zip(self.chain.tolist(), self.resnum.tolist(), self.icode.tolist(), self.name.tolist()))

    def subset(self, atoms: np.ndarray | slice | None = None, models=None) -> "Structure":
        """A new Structure with the chosen atom indices / mask and models."""
        atoms = slice(None) if atoms is None else atoms
        models = slice(None) if models is None else models
        c = self.coords[models][:, atoms] if not isinstance(models, int) else self.coords[models][None][:, atoms]
        return Structure(c, *(getattr(self, k)[atoms] for k in
                              ("element", "name", "resname", "resnum", "chain", "icode", "bfactor")))

    def select(self, kind: str) -> "Structure":
        """``"ca"`` (C-alpha only), ``"backbone"`` (N, CA, C, O), ``"heavy"`` (no H, no water) or ``"all"``."""
        protein = np.isin(self.resname, list(RESIDUES))
        masks = {
            "all": np.ones(self.n_atoms, bool),
            "heavy": ~np.isin(self.element, ["H", "D"]) & ~np.isin(self.resname, WATER),
            "backbone": np.isin(self.name, BACKBONE) & protein,
            "ca": (self.name == "CA") & (self.element != "CA") & protein,
        }
        if kind not in masks:
            raise ValueError(f"selection: expected one of {sorted(masks)}, got {kind!r}")
        return self.subset(np.flatnonzero(masks[kind]))

    def is_ca_only(self) -> bool:
        return bool(self.n_atoms) and bool(np.all(self.name == "CA")) and bool(np.all(self.element != "CA"))

    def centroid(self) -> np.ndarray:
        """(3,) mean position over all models and atoms, Å."""
        return self.coords.reshape(-1, 3).mean(0)

    def with_coords(self, coords: np.ndarray) -> "Structure":
        c = np.asarray(coords, dtype=np.float64)
        return Structure(c, self.element, self.name, self.resname, self.resnum, self.chain, self.icode, self.bfactor)

    def tensor(self, dtype=torch.float32, device=None) -> Tensor:
        """(M, N, 3) coordinates as a torch tensor (Å)."""
        return torch.as_tensor(self.coords, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- reading / writing
def _element_of(atom) -> str:
    el = (atom.element or "").strip().upper()
    if not el or el == "X":
        name = atom.get_id().strip().upper()
        two = name[:2] in PENG_1996 and len(name) > 1 and not name[0].isdigit()
        el = name[:2] if two else name.lstrip("0123456789")[:1]
    return el


EXAMPLES = Path(__file__).resolve().parent / "data"  # 1ubi, 2k39_ca_ensemble, 3o21, 6flr (.pdb.gz)


def example_structure(name: str) -> Path:
    """Path of a bundled example model, e.g. ``example_structure("3o21")`` (see cryoem/data/README.md)."""
    path = EXAMPLES / f"{name}.pdb.gz"
    if not path.is_file():
        have = sorted(p.name.split(".")[0] for p in EXAMPLES.glob("*.pdb.gz"))
        raise UserError(f"no bundled structure {name!r}; have {have}")
    return path


def read_structure(path: str | Path, models: str = "all") -> Structure:
    """Read a PDB (``.pdb``/``.ent``) or mmCIF (``.cif``) file, optionally gzipped (``.gz``);
    every model becomes one ensemble member.

    Alternate locations keep biopython's choice (highest occupancy). Models must hold the same
    atoms; a model with a different atom list raises ``UserError``. ``models="first"`` keeps one.
    """
    from Bio.PDB import MMCIFParser, PDBParser
    from Bio.PDB.PDBExceptions import PDBConstructionException

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: structure file not found")
    gz = path.suffix.lower() == ".gz"
    is_cif = (path.with_suffix("") if gz else path).suffix.lower() in (".cif", ".mmcif")
    parser = MMCIFParser(QUIET=True) if is_cif else PDBParser(QUIET=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = io.StringIO(gzip.decompress(path.read_bytes()).decode()) if gz else str(path)
            st = parser.get_structure(path.stem, source)
    except (PDBConstructionException, ValueError, KeyError, IndexError, OSError, EOFError, UnicodeDecodeError) as e:
        kind = "mmCIF" if is_cif else "PDB"
        raise UserError(f"{path}: cannot parse as {kind} ({' '.join(str(e).split())[:300]})") from e
    all_models = list(st)
    if not all_models or not any(True for _ in all_models[0].get_atoms()):
        raise UserError(f"{path}: no atoms found")
    if models == "first":
        all_models = all_models[:1]
    ref_atoms = list(all_models[0].get_atoms())
    keys = [_atom_key(a) for a in ref_atoms]
    coords = [np.array([a.coord for a in ref_atoms])]
    for m in all_models[1:]:
        atoms = list(m.get_atoms())
        if [_atom_key(a) for a in atoms] != keys:
            raise UserError(f"{path}: model {m.serial_num} has a different atom list from model "
                            f"{all_models[0].serial_num}; split the file or match atoms first")
        coords.append(np.array([a.coord for a in atoms]))
    coords = np.stack(coords).astype(np.float64)
    _check_finite(path, coords, all_models)
    res = [a.get_parent() for a in ref_atoms]
    return Structure(
        coords=coords,
        element=np.array([_element_of(a) for a in ref_atoms], dtype=object),
        name=np.array([a.get_id().strip() for a in ref_atoms], dtype=object),
        resname=np.array([r.get_resname().strip() for r in res], dtype=object),
        resnum=np.array([r.id[1] for r in res], dtype=np.int64),
        chain=np.array([r.get_parent().id for r in res], dtype=object),
        icode=np.array([r.id[2].strip() for r in res], dtype=object),
        bfactor=np.array([a.get_bfactor() for a in ref_atoms], dtype=np.float64),
    )


def _check_finite(path: Path, coords: np.ndarray, models: list) -> None:
    """UserError naming the model (1-based, in file order) and atom (serial number, chain, residue,
    name) of the first coordinate in ``coords`` (M, N, 3, Å) that is NaN or inf ("nan" parses as NaN)."""
    bad = np.argwhere(~np.isfinite(coords).all(-1))
    if len(bad):
        m, i = (int(v) for v in bad[0])
        atom = list(models[m].get_atoms())[i]
        chain, resnum, icode, name = _atom_key(atom)
        res = atom.get_parent().get_resname().strip()
        xyz = ", ".join(f"{v:.3f}" for v in coords[m, i])
        raise UserError(f"{path}: model {m + 1}, atom {atom.get_serial_number()} ({chain} {res} {resnum}{icode} "
                        f"{name}): coordinate ({xyz}) is not a finite number")


def _atom_key(a) -> tuple:
    r = a.get_parent()
    return (r.get_parent().id, r.id[1], r.id[2].strip(), a.get_id().strip())


def _pdb_atom_name(name: str, element: str) -> str:
    return f" {name:<3s}" if len(name) < 4 and len(element) == 1 else f"{name:<4s}"


def write_pdb(path: str | Path, structure: Structure) -> None:
    """Write every model as ``MODEL``/``ENDMDL`` blocks of fixed-column ATOM records (atomically)."""
    s = structure
    if not np.isfinite(s.coords).all():
        raise ValueError("write_pdb: coordinates contain NaN or inf")
    if np.abs(s.coords).max(initial=0) >= 1e4:
        raise ValueError("write_pdb: coordinates beyond the PDB format's range (|x| >= 10000 Å)")
    lines = []
    for m in range(s.n_models):
        lines.append(f"MODEL     {m + 1:4d}")
        for i in range(s.n_atoms):
            x, y, z = s.coords[m, i]
            lines.append(
                f"ATOM  {(i + 1) % 100000:5d} {_pdb_atom_name(s.name[i], s.element[i])} {s.resname[i]:>3s} "
                f"{str(s.chain[i])[:1]:1s}{int(s.resnum[i]) % 10000:4d}{str(s.icode[i])[:1]:1s}   "
                f"{x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{float(s.bfactor[i]):6.2f}          {s.element[i]:>2s}")
        lines.append("ENDMDL")
    lines.append("END")
    atomic_write(path, "\n".join(lines) + "\n")


def write_cif(path: str | Path, structure: Structure, name: str = "plato") -> None:
    """Write a minimal mmCIF ``atom_site`` loop with every model (``pdbx_PDB_model_num``)."""
    s = structure
    cols = ["group_PDB", "id", "type_symbol", "label_atom_id", "label_alt_id", "label_comp_id", "label_asym_id",
            "label_entity_id", "label_seq_id", "pdbx_PDB_ins_code", "Cartn_x", "Cartn_y", "Cartn_z", "occupancy",
            "B_iso_or_equiv", "auth_seq_id", "auth_comp_id", "auth_asym_id", "auth_atom_id", "pdbx_PDB_model_num"]
    lines = [f"data_{name}", "loop_", *(f"_atom_site.{c}" for c in cols)]
    k = 0
    for m in range(s.n_models):
        for i in range(s.n_atoms):
            k += 1
            x, y, z = s.coords[m, i]
            ic = s.icode[i] or "?"
            lines.append(f"ATOM {k} {s.element[i]} {s.name[i]} . {s.resname[i]} {s.chain[i]} 1 {s.resnum[i]} {ic} "
                         f"{x:.3f} {y:.3f} {z:.3f} 1.00 {float(s.bfactor[i]):.2f} {s.resnum[i]} {s.resname[i]} "
                         f"{s.chain[i]} {s.name[i]} {m + 1}")
    atomic_write(path, "\n".join(lines) + "\n#\n")


# ----------------------------------------------------------------------------- scattering
def _peng(element: str) -> tuple[np.ndarray, np.ndarray]:
    el = element.upper()
    if el == "D":
        el = "H"
    if el not in PENG_1996:
        warnings.warn(f"no Peng 1996 scattering factor for element {element!r}; using carbon", stacklevel=3)
        el = "C"
    a, b = PENG_1996[el]
    return np.array(a), np.array(b)


def scattering_gaussians(structure: Structure, bfactor: float = 0.0, mode: str = "single"
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian masses and widths representing each atom's electron scattering potential.

    Args:
        structure: N atoms; a C-alpha-only model gets per-residue pseudo-atoms.
        bfactor: extra isotropic B-factor (Å^2) added to every Gaussian (blurring).
        mode: ``"single"`` (one moment-matched Gaussian per atom) or ``"peng5"`` (5 per atom).
    Returns:
        ``atom_index`` (K,) int (which atom each Gaussian belongs to), ``amplitude`` (K,)
        masses (Peng units, Å), ``sigma`` (K,) standard deviations (Å). K = N or 5N.
    """
    if mode not in ("single", "peng5"):
        raise ValueError(f"mode: expected 'single' or 'peng5', got {mode!r}")
    if structure.is_ca_only():
        amp, sig = _residue_pseudo_atoms(structure.resname, bfactor)
        return np.arange(structure.n_atoms), amp, sig
    table = {el: _peng(el) for el in set(structure.element.tolist())}
    a = np.stack([table[el][0] for el in structure.element])  # (N, 5)
    b = np.stack([table[el][1] for el in structure.element]) + bfactor
    if mode == "peng5":
        return np.repeat(np.arange(structure.n_atoms), 5), a.reshape(-1), np.sqrt(b / (8 * math.pi**2)).reshape(-1)
    f0 = a.sum(1)
    var = (a * b).sum(1) / (8 * math.pi**2 * f0)
    return np.arange(structure.n_atoms), f0, np.sqrt(var)


def _residue_pseudo_atoms(resname: np.ndarray, bfactor: float) -> tuple[np.ndarray, np.ndarray]:
    a_c, b_c = _peng("C")
    var_c = (a_c * (b_c + bfactor)).sum() / (8 * math.pi**2 * a_c.sum())
    amp, var = [], []
    for r in resname:
        comp, msd = RESIDUES.get(str(r).upper(), RESIDUES["ALA"])
        amp.append(sum(n * _peng(el)[0].sum() for el, n in comp.items()))
        var.append(var_c + msd / 3)
    return np.array(amp), np.sqrt(np.array(var))


# ----------------------------------------------------------------------------- bonds
def residue_groups(structure: Structure) -> tuple[np.ndarray, list[str]]:
    """Per-atom residue index (N,) int64, in order of first appearance, and one label per residue
    (``chain:number`` plus insertion code)."""
    keys = list(zip(structure.chain.tolist(), structure.resnum.tolist(), structure.icode.tolist()))
    uniq = list(dict.fromkeys(keys))
    pos = {k: i for i, k in enumerate(uniq)}
    return np.array([pos[k] for k in keys], dtype=np.int64), [f"{c}:{n}{i}" for c, n, i in uniq]


def bonded_pairs(structure: Structure, model: int = 0) -> np.ndarray:
    """(E, 2) int array of bonded atom pairs ``i < j`` inferred from the chosen model.

    All-atom: ``d < r_i + r_j + 0.45 Å`` with covalent radii by element. C-alpha-only:
    consecutive residues of the same chain with ``d < 4.2 Å``.
    """
    from scipy.spatial import cKDTree

    x = structure.coords[model]
    if structure.is_ca_only():
        order = np.lexsort((structure.resnum, structure.chain))
        i, j = order[:-1], order[1:]
        ok = (structure.chain[i] == structure.chain[j]) & (np.linalg.norm(x[i] - x[j], axis=1) < CA_CA_MAX)
        pairs = np.stack([i[ok], j[ok]], 1)
        return np.sort(pairs, 1)
    r = np.array([COVALENT_RADII.get(str(e).upper(), 0.76) for e in structure.element])
    cand = cKDTree(x).query_pairs(2 * r.max() + BOND_TOLERANCE, output_type="ndarray")
    if len(cand) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    d = np.linalg.norm(x[cand[:, 0]] - x[cand[:, 1]], axis=1)
    ok = (d < r[cand[:, 0]] + r[cand[:, 1]] + BOND_TOLERANCE) & (d > 0.4)
    return np.sort(cand[ok], 1).astype(np.int64)


# ----------------------------------------------------------------------------- superposition
def kabsch(P: Tensor, Q: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Optimal rotation and translation with ``P @ R^T + t ~= Q`` (proper rotations only).

    Args:
        P, Q: (..., N, 3) matched point sets.
        weights: optional (N,) or (..., N) non-negative weights.
    Returns:
        R (..., 3, 3), t (..., 3).
    """
    w = torch.ones(P.shape[:-1], dtype=P.dtype, device=P.device) if weights is None else weights.expand(P.shape[:-1])
    w = (w / w.sum(-1, keepdim=True))[..., None]
    pc, qc = (w * P).sum(-2, keepdim=True), (w * Q).sum(-2, keepdim=True)
    H = ((P - pc) * w).transpose(-1, -2) @ (Q - qc)  # (..., 3, 3)
    U, _, Vh = torch.linalg.svd(H)
    d = torch.sign(torch.det(Vh.transpose(-1, -2) @ U.transpose(-1, -2)))
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    R = Vh.transpose(-1, -2) @ D @ U.transpose(-1, -2)
    t = qc[..., 0, :] - (pc @ R.transpose(-1, -2))[..., 0, :]
    return R, t


def superpose(P: Tensor, Q: Tensor, weights: Tensor | None = None) -> Tensor:
    """``P`` (..., N, 3) moved onto ``Q`` by the Kabsch rotation and translation."""
    R, t = kabsch(P, Q, weights)
    return P @ R.transpose(-1, -2) + t[..., None, :]


def rmsd(P: Tensor, Q: Tensor, superposition: bool = True) -> Tensor:
    """RMSD (Å) between matched (..., N, 3) coordinates, after Kabsch superposition or as given."""
    if superposition:
        P = superpose(P, Q)
    return ((P - Q) ** 2).sum(-1).mean(-1).sqrt()


def rmsf(models: np.ndarray) -> np.ndarray:
    """Root-mean-square fluctuation (Å) of each atom across models (M, N, 3) -> (N,), about the mean model."""
    models = np.asarray(models, dtype=np.float64)
    return np.sqrt(((models - models.mean(0)) ** 2).sum(-1).mean(0))


def match_atoms(a: Structure, b: Structure) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(ia, ib)`` of the atoms present in both, matched by (chain, resnum, icode, name).

    Raises ``UserError`` when nothing matches.
    """
    kb = {k: i for i, k in enumerate(b.keys())}
    pairs = [(i, kb[k]) for i, k in enumerate(a.keys()) if k in kb]
    if not pairs:
        raise UserError("no atoms match by (chain, residue number, atom name) between the two models")
    ia, ib = np.array(pairs).T
    return ia, ib
