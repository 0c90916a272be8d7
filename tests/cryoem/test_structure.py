"""Atomic models: readers, selections, scattering, bonds, superposition, matching, writers."""

import math

import numpy as np
import pytest
import torch
from Bio.PDB import PDBParser

from cryoem.structure import (
    PENG_1996,
    Structure,
    bonded_pairs,
    kabsch,
    match_atoms,
    read_structure,
    rmsd,
    rmsf,
    scattering_gaussians,
    superpose,
    write_cif,
    write_pdb,
)
from plato_core.runinfo import UserError

from .test_conventions import DATA


@pytest.fixture(scope="module")
def ubi():
    return read_structure(DATA / "1ubi.pdb")


def test_read_pdb_matches_biopython_directly(ubi):
    ref = list(PDBParser(QUIET=True).get_structure("x", str(DATA / "1ubi.pdb")).get_atoms())
    assert ubi.n_models == 1 and ubi.n_atoms == len(ref)
    assert np.allclose(ubi.coords[0], [a.coord for a in ref], atol=1e-4)
    assert ubi.resname[0] == "MET" and ubi.name[1] == "CA" and ubi.resnum[0] == 1 and ubi.chain[0] == "A"
    assert set(ubi.element) == {"C", "N", "O", "S"}


def test_ensemble_and_selections(ubi):
    ens = read_structure(DATA / "2k39_ca_10models.pdb")
    assert ens.coords.shape == (10, 76, 3) and ens.is_ca_only()
    heavy = ubi.select("heavy")
    assert heavy.n_atoms == 602  # 683 records minus 81 waters
    assert ubi.select("ca").n_atoms == 76 and ubi.select("ca").is_ca_only()
    assert ubi.select("backbone").n_atoms == 4 * 76
    assert ubi.select("all").n_atoms == ubi.n_atoms
    with pytest.raises(ValueError, match="selection"):
        ubi.select("sidechains")


def test_pdb_and_cif_writers_round_trip(tmp_path, ubi):
    ens = read_structure(DATA / "2k39_ca_10models.pdb")
    for name, writer in (("e.pdb", write_pdb), ("e.cif", write_cif)):
        writer(tmp_path / name, ens)
        back = read_structure(tmp_path / name)
        assert back.n_models == 10 and np.allclose(back.coords, ens.coords, atol=1e-3)
        assert back.keys() == ens.keys()
    heavy = ubi.select("heavy")
    write_cif(tmp_path / "u.cif", heavy)
    back = read_structure(tmp_path / "u.cif")
    assert list(back.element) == list(heavy.element) and np.allclose(back.coords, heavy.coords, atol=1e-3)


def test_reader_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_structure(tmp_path / "missing.pdb")
    (tmp_path / "empty.pdb").write_text("HEADER nothing here\n")
    with pytest.raises(UserError, match="no atoms"):
        read_structure(tmp_path / "empty.pdb")


@pytest.mark.parametrize("value", ["     nan", "     inf", "    -inf"])
def test_non_finite_pdb_coordinate_is_a_user_error(tmp_path, value):
    lines = (DATA / "1ubi.pdb").read_text().splitlines()
    k = [i for i, line in enumerate(lines) if line.startswith("ATOM")][6]
    line = lines[k]
    lines[k] = line[:38] + value + line[46:]  # the y field, columns 39-46
    (tmp_path / "bad.pdb").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        read_structure(tmp_path / "bad.pdb")
    serial, name, resname, chain, resnum = int(line[6:11]), line[12:16].strip(), line[17:20], line[21], int(line[22:26])
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'bad.pdb'}: model 1, atom {serial} ({chain} {resname} {resnum} {name}): "
                          f"coordinate ({line[30:38].strip()}, {value.strip()}, {line[46:54].strip()})")
    assert "\n" not in msg
    assert msg.endswith("is not a finite number") and value.strip() in msg


def test_non_finite_cif_coordinate_is_a_user_error(tmp_path):
    ens = read_structure(DATA / "2k39_ca_10models.pdb")
    write_cif(tmp_path / "e.cif", ens)
    lines = (tmp_path / "e.cif").read_text().splitlines()
    atoms = [i for i, line in enumerate(lines) if line.startswith("ATOM ")]
    k = atoms[ens.n_atoms + 4]  # model 2, atom 5
    fields = lines[k].split()
    fields[11] = "nan"  # Cartn_y
    lines[k] = " ".join(fields)
    (tmp_path / "e.cif").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        read_structure(tmp_path / "e.cif")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'e.cif'}: model 2, atom {fields[1]} ({ens.chain[4]} {ens.resname[4]} "
                          f"{ens.resnum[4]} CA): coordinate ({fields[10]}, nan, {fields[12]})") and "\n" not in msg


def test_peng_scattering_single_and_five_gaussian(ubi):
    s = ubi.select("heavy")
    idx, amp, sig = scattering_gaussians(s)
    a_c, b_c = PENG_1996["C"]
    c = int(np.flatnonzero(s.element == "C")[0])
    assert amp[c] == pytest.approx(sum(a_c))
    var = sum(a * b for a, b in zip(a_c, b_c)) / (8 * math.pi**2 * sum(a_c))
    assert sig[c] == pytest.approx(math.sqrt(var))
    idx5, amp5, sig5 = scattering_gaussians(s, bfactor=20.0, mode="peng5")
    assert len(amp5) == 5 * s.n_atoms and np.allclose(np.bincount(idx5, amp5), amp)
    assert sig5[5 * c] == pytest.approx(math.sqrt((b_c[0] + 20.0) / (8 * math.pi**2)))
    # heavier atoms scatter more
    assert amp[s.element == "S"].min() > amp[s.element == "O"].max()


def test_ca_pseudo_atoms_carry_the_residue(ubi):
    ca = ubi.select("ca")
    _, amp, sig = scattering_gaussians(ca)
    trp_like = amp[ca.resname == "ARG"].mean() > amp[ca.resname == "GLY"].mean()
    assert trp_like and sig[ca.resname == "ARG"].mean() > sig[ca.resname == "GLY"].mean()
    heavy = ubi.select("heavy")
    _, amp_atoms, _ = scattering_gaussians(heavy)
    assert amp.sum() == pytest.approx(amp_atoms.sum(), rel=0.05)  # residue masses add up (minus OXT)


def test_bonded_pairs(ubi):
    heavy = ubi.select("heavy")
    bonds = bonded_pairs(heavy)
    d = np.linalg.norm(heavy.coords[0, bonds[:, 0]] - heavy.coords[0, bonds[:, 1]], axis=1)
    assert 1.1 < d.min() and d.max() < 2.0
    assert 0.95 * heavy.n_atoms < len(bonds) < 1.1 * heavy.n_atoms  # a protein has ~1 bond per heavy atom
    ca_bonds = bonded_pairs(heavy.select("ca"))
    assert len(ca_bonds) == 75 and (np.diff(ca_bonds, axis=1) == 1).all()


def test_kabsch_recovers_a_known_motion_and_rmsd(ubi):
    P = torch.as_tensor(ubi.select("heavy").coords[0])
    from cryoem.simulate import random_rotations

    R0 = random_rotations(1, torch.Generator().manual_seed(3))[0]
    t0 = torch.tensor([5.0, -3.0, 12.0], dtype=torch.float64)
    Q = P @ R0.T + t0
    R, t = kabsch(P, Q)
    assert torch.allclose(R, R0, atol=1e-8) and torch.allclose(t, t0, atol=1e-6)
    assert rmsd(P, Q).item() < 1e-6 and rmsd(P, Q, superposition=False).item() > 1.0
    noisy = Q + 0.5 * torch.randn(Q.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rmsd(P, noisy).item() == pytest.approx(0.5 * math.sqrt(3), rel=0.1)
    assert torch.allclose(superpose(P, Q), Q, atol=1e-6)


def test_kabsch_is_batched_and_proper():
    g = torch.Generator().manual_seed(1)
    P = torch.randn(4, 20, 3, generator=g, dtype=torch.float64)
    Q = -P  # an inversion: the best proper rotation must not reflect
    R, _ = kabsch(P, Q)
    assert R.shape == (4, 3, 3) and torch.allclose(torch.det(R), torch.ones(4, dtype=torch.float64))


def test_rmsf_of_atoms_swinging_between_two_positions():
    """Half the models put atom 0 at +d x, half at -d x: its RMSF is d; a fixed atom's is 0."""
    models = np.zeros((6, 2, 3))
    models[:3, 0, 0], models[3:, 0, 0] = 1.5, -1.5
    assert np.allclose(rmsf(models), [1.5, 0.0])


def test_match_atoms_by_chain_residue_name(ubi):
    a = ubi.select("heavy")
    b = a.subset(np.arange(a.n_atoms)[::-1][:300])  # reversed, partial
    ia, ib = match_atoms(a, b)
    assert len(ia) == 300
    assert np.allclose(a.coords[0, ia], b.coords[0, ib])
    other = Structure(np.zeros((1, 1, 3)), np.array(["C"]), np.array(["CA"]), np.array(["GLY"]), np.array([999]),
                      np.array(["Z"]))
    with pytest.raises(UserError, match="no atoms match"):
        match_atoms(a, other)


def test_bundled_gzipped_examples_read():
    from cryoem.structure import example_structure

    s = read_structure(example_structure("1ubi"))
    assert s.n_atoms == 683 and s.select("heavy").n_atoms == 602
    with pytest.raises(UserError, match="no bundled structure"):
        example_structure("nope")
