"""The atom-coordinate VAE (Rosenbaum et al. 2021): particle image -> latent z -> atom coordinates.

One training step (the encode, decode, render, compare loop of every Plato autoencoder, with cryo-EM parts)::

    image --ConvEncoder--> q(z|x) --z--> AtomDecoder --> coordinates (B, N, 3) Å
        --gaussian_projection(camera from pose)--> projection --CTF, low-pass--> model image
    loss = -log p(image | model image) + beta * KL(q || N(0, I)) + structural priors

* The posterior q(z | x) (``posterior="laplace"``, the default) is a Laplace approximation: from
  the encoder's guess, one Gauss-Newton step of the decoder + renderer against the particle
  image, under the N(0, I) prior (:meth:`AtomVAE.laplace`). The encoder is trained to predict
  that posterior (``enc_fit``); the decoder learns from samples of it (variational EM).
  Why: with an amortised encoder alone (``"amortized"``, cryoDRGN's scheme) training starts
  at a saddle. The decoder barely depends on z, so the encoder gets almost no gradient, and
  the encoder's outputs barely differ between particles, so the decoder has nothing to use.
  On 64-px SNR-0.1 particles it stayed there for 1,000-3,000 steps ("posterior collapse").
  The Gauss-Newton step reads each particle's evidence through the decoder's Jacobian, so the
  latent carries information from the first steps. It costs zdim + 1 extra renderings
  per particle, without gradients.
* Each particle's Gauss-Newton step starts from its posterior mean at its previous visit
  (``warm_start``), so its posterior converges over the epochs; and every ``whiten_every``
  steps the latent is re-expressed so that the aggregate posterior is N(0, I) (:meth:`AtomVAE.whiten`,
  PX-EM). Without them the decoder learnt to make a whole motion from a sliver of one latent
  direction, which then had the least spread of all (the motion in latent PC8 of 8).
* The encoder, the KL / Gaussian likelihood and the trainer are scene3d's; the projector
  is ``renderers.gaussian``; the CTF is ``cryoem.ctf``. This module only wires them.
* The decoder outputs a displacement of every modelled atom from the starting model: rigid motions of blocks
  of 20 consecutive residues plus a displacement per residue smoothed over 5 Å (:class:`AtomDecoder`);
  its last layers start near zero, so training starts from the starting model.
* Before its Gauss-Newton step, each particle tries other particles' posterior means as its start
  (:meth:`AtomVAE.search`): its posterior along the latent often has more than one maximum.
* The likelihood is Gaussian on pixels with the noise sigma estimated from the data
  (the image corners outside the particle), evaluated in Fourier space (Parseval), where
  the CTF and the optional low-pass curriculum are applied. ``likelihood="correlation"``
  replaces it by ``n_pixels * (1 - Pearson correlation)``.
* The scale between projected density and image values is learned (one scalar).
* ``infer_poses`` (experimental, for particles without consensus poses): a :class:`PoseEncoder` maps
  each image to K pose hypotheses. It is trained only on views the model simulates of itself (random
  uniform rotations, random shifts, the batch's CTFs, the data's noise level; the "sleep" phase of
  wake-sleep), with a winner-takes-all loss so that pseudo-symmetric views can keep separate
  hypotheses. The reconstruction ("wake") uses, per image, the hypothesis whose rendering of the mean
  model fits the image best. No gradient flows from the reconstruction into the poses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from cryoem.ctf import CTFParams, ctf_2d
from cryoem.imaging import fourier_filter, project, project_jvp
from cryoem.priors import StructuralPrior
from cryoem.simulate import random_rotations
from cryoem.structure import rmsf
from plato_core.encoders import ConvEncoder
from plato_core.objective import active_units, gaussian_kl, gaussian_log_likelihood, reparameterize
from plato_core.runinfo import UserError
from plato_core.settings import SettingError, setting
from renderers.cameras import axis_angle_to_matrix, rotation_6d_to_matrix
from renderers.gaussian import AffineUnits, merge_units


@dataclass
class AtomVAEConfig:
    """Model settings (written to config.json; each field with a flag is a ``cryoem train`` option). Lengths in Å."""

    zdim: int = setting(8, "latent dimensions")
    enc_width: int = setting(32, "channels of the encoder's first stage")
    enc_downsample: int = setting(0, "the encoder sees images pooled by this factor (0: from the box, to about "
                                     "32 px; see enc_pooling)")
    dec_hidden: int = setting(256, "width of the decoder MLP")
    dec_layers: int = setting(3, "layers of the decoder MLP", cli=False)
    dec_scale: float = setting(0.5, "Å per unit of the decoder's last layer: how fast the decoded atoms move per "
                                    "optimiser step (see AtomDecoder)")
    dec_smooth: float = setting(5.0, "Å: the decoder moves residues, smoothed over this distance (see AtomDecoder); "
                                     "0: every atom on its own (use --dec-scale 10 with it)")
    dec_rigid: tuple[int, ...] = setting((20,), "residues per rigid block, one number per level (e.g. 40 10): the "
                                              "decoder also turns and moves blocks of that many consecutive "
                                              "residues of a chain as rigid bodies (see RigidBlocks); 0: off")
    beta: float | None = setting(None, "KL weight (default 1 / zdim, as cryoDRGN)")
    kl_warmup: int = setting(500, "steps over which the KL weight ramps up from 0", cli=False)
    posterior: str = setting("laplace", "laplace: each particle's latent posterior by a Gauss-Newton step of the "
                                        "decoder and renderer from the encoder's guess; amortized: the encoder alone, "
                                        "as cryoDRGN (its latent can take thousands of steps to carry information)",
                             choices=("laplace", "amortized"))
    gn_steps: int = setting(1, "laplace: Gauss-Newton steps per particle and training step")
    particle_nuisance: bool = setting(True, "laplace: estimate each particle's contrast and B-factor with its latent "
                                            "(see AtomVAE.laplace)")
    warm_start: bool = setting(True, "laplace: start each particle's Gauss-Newton step from its posterior mean at "
                                     "its last visit")
    search: int = setting(4, "laplace: other particles' posterior means tried as each particle's start, per step "
                             "(see AtomVAE.search); 0: off")
    coarse_search: bool = setting(True, "laplace: the search renders each candidate with one Gaussian per residue "
                                        "(see AtomVAE.search)")
    whiten_every: int = setting(100, "laplace: steps between re-expressions of the latent (PX-EM, see "
                                     "AtomVAE.whiten): axes along the decoder's directions of structural change, "
                                     "largest first, prior = aggregate posterior; 0: off")
    enc_reference: bool = setting(False, "the encoder also sees the starting model rendered at each particle's "
                                         "pose and CTF (with the Laplace posterior it did not help and cost 5% of "
                                         "the speed)")
    likelihood: str = setting("gaussian", "gaussian: the images' noise model; correlation: 1 - correlation, "
                                          "scaled by the pixel count", choices=("gaussian", "correlation"))
    w_bond: float = setting(1.0, "weight of the bond-length prior, per Å² of change, times the pixel count / 1000")
    w_local: float = setting(0.1, "weight of the local-distance prior (pairs within 10 Å), as --w-bond (see "
                                  "AtomVAE.prior_weights: at 1 it outweighed the images' evidence for real motions)")
    w_clash: float = setting(0.1, "weight of the clash prior (non-bonded pairs closer than 3 Å), as --w-bond")
    w_linear: float = setting(10.0, "weight of the decoder's non-linearity in z, per Å² of mean squared atom "
                                    "deviation from linear between pairs of latents, as --w-bond (see "
                                    "AtomVAE.nonlinearity: without it the latent folded in longer runs)")
    prior_samples: int = setting(16, "decoded models of a batch the priors are evaluated on (unbiased, cheaper)",
                                 cli=False)
    local_radius: float = setting(10.0, "Å: pairs closer than this in the starting model keep their distance",
                                  cli=False)
    clash_threshold: float = setting(3.0, "Å: non-bonded pairs closer than this clash", cli=False)
    lowpass_start: float | None = setting(None, "resolution curriculum: start with a low-pass at this many Å, "
                                                "reaching Nyquist after curriculum_steps (default: off)")
    curriculum_steps: int = setting(2000, "steps of the resolution curriculum", cli=False)
    refine_poses: bool = setting(False, "learn small per-particle pose corrections")
    infer_poses: bool = setting(False, "experimental: infer poses with a pose encoder trained on the model's own "
                                       "simulated views (for particles without consensus poses)")
    pose_heads: int = setting(4, "--infer-poses: pose hypotheses per image")
    pose_shift_px: float = setting(1.0, "--infer-poses: std of the simulated shifts, px", cli=False)
    pose_weight: float = setting(1.0, "--infer-poses: weight of the pose loss (per image), relative to 1 nat",
                                 cli=False)
    pose_warmup: int = setting(1000, "--infer-poses: steps that train only the pose encoder, on the starting model")


MAX_STALE_WHITENS = 5  # a stored posterior mean older than this many re-expressions is not used (AtomVAE.fresh)
WHITEN_EARLY_STEPS = 1000  # re-express every whiten_every steps up to here; after it, at most ...
WHITENS_PER_EPOCH = MAX_STALE_WHITENS - 1  # ... this many times per epoch, so a mean stored once per epoch stays fresh
POSTERIOR_SAMPLES = 32  # draws per particle of AtomVAE.importance_mean
TEMPER = 64  # its wide proposal: the likelihood tempered by 1 / TEMPER (8 times wider where the image decides)


def enc_pooling(box: int, target: int = 32) -> int:
    """The encoder's pooling factor for a box: the largest divisor of ``box`` that keeps at least ``target`` px
    (64 -> 2, 128 -> 4, 256 -> 8; 1 for boxes under 64). The encoder reads shapes, not fine detail."""
    return max(f for f in range(1, max(1, box // target) + 1) if box % f == 0)


class AtomDecoder(nn.Module):
    """MLP from z (B, zdim) to coordinates (B, N, 3) = x0 + ``scale`` * out(mlp(z)) (Å).

    ``scale`` (Å) sets how far atoms can move per optimiser step: Adam changes every parameter by about
    the learning rate per step, so with the output in units of ``scale`` Å the decoded atoms move up to
    ~lr * scale Å per step (1e-3 * 10 = 0.01 Å). With the output in Å (scale 1) a 5 Å domain motion
    needed thousands of steps. The hidden layers are He-initialised, so their activations are O(1).

    With ``smooth`` > 0 (Å) the last layer gives one displacement per residue (``groups``: each atom's residue,
    (N,)), smoothed over residues by a Gaussian kernel of that width on the starting model's residue centres
    (:func:`residue_kernel`), and every atom moves with its residue: the decoder's motions are smooth at that
    length. Why: each particle's image says little about any one atom, so a per-atom last layer learnt from
    gradients that were mostly noise. Measured on a 6,028-atom hinge (SNR 0.1), training only the decoder with
    the latent set to the true coordinate: after 1,200 steps the per-atom decoder had learnt 19 % of the motion
    (cosine 0.38 with the true one); smoothed over residues at 5 Å, 54 % after 100 steps (cosine 0.83).
    A smoothed decoder learns so fast that at scale 10 it learnt motions before the latents carried information
    (a domain hinge ended up spread over two latent dimensions: |rho| 0.41); at scale 0.5, 20 times slower per
    step, it does not. Smoothed at 5 Å with scale 0.5 is the default (with the structural priors at 0.1, see
    AtomVAE.prior_weights); ``cryoem train`` on the README's development cases: see the README.

    With ``rigid`` (residues per block, one number per level; chains: (R,) each residue's chain) the decoder also
    turns and moves blocks of consecutive residues as rigid bodies (:class:`RigidBlocks`), and the smoothed
    displacement above is added to them. Blocks of 20 residues are the default: with the true latent, the
    decoder then reached 98 % of a 40-degree domain hinge in 10 minutes, against 60 % without them.
    """

    def __init__(self, x0: Tensor, zdim: int, hidden: int, layers: int, scale: float = 10.0,
                 groups: Tensor | None = None, smooth: float = 0.0, chains: Tensor | None = None,
                 rigid: tuple[int, ...] = ()):
        super().__init__()
        self.register_buffer("x0", x0.clone())
        self.scale = float(scale)
        dims = [zdim] + [hidden] * layers
        mlp = []
        for a, b in zip(dims[:-1], dims[1:]):
            mlp += [nn.Linear(a, b), nn.LeakyReLU(0.1)]
            nn.init.kaiming_normal_(mlp[-2].weight, a=0.1, nonlinearity="leaky_relu")
            nn.init.zeros_(mlp[-2].bias)
        self.mlp = nn.Sequential(*mlp)
        self.register_buffer("group", None, persistent=False)  # smooth: rebuilt from the starting model
        self.register_buffer("kernel", None, persistent=False)
        outputs = len(x0)
        if smooth > 0:
            self.group = torch.arange(len(x0)) if groups is None else torch.as_tensor(groups).long()
            self.kernel = residue_kernel(x0, self.group, smooth)
            outputs = self.kernel.shape[0]
        self.out = nn.Linear(hidden, 3 * outputs)
        # near-zero start: the starting model to within ~0.01 Å, yet z already reaches the output
        nn.init.normal_(self.out.weight, std=1e-3 / (self.scale * hidden**0.5))
        nn.init.zeros_(self.out.bias)
        self.rigid = None
        if any(k < 0 for k in rigid):
            raise SettingError("dec_rigid", f"residues per block must be 1 or more (0: off), got {list(rigid)}")
        if any(rigid):
            group = self.group if self.group is not None else torch.arange(len(x0))  # the fine part's units
            residue = torch.arange(len(x0)) if groups is None else torch.as_tensor(groups).long()
            chain = torch.zeros(int(residue.max()) + 1, dtype=torch.long) if chains is None else chains.long()
            self.rigid = RigidBlocks(x0, residue, chain, tuple(k for k in rigid if k), group, hidden, self.scale)

    def forward(self, z: Tensor) -> Tensor:
        return self.x0 + self.displacement(z)

    def _fine(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(B, zdim) -> the hidden features (B, H) and the fine displacement of each unit (B, U, 3) Å."""
        h = self.mlp(z)
        if self.group is None:
            return h, self.scale * self.out(h).view(len(z), -1, 3)
        R, H = self.kernel.shape[0], h.shape[-1]  # the kernel is folded into the last layer: once per call, not per z
        w = torch.sparse.mm(self.kernel, self.out.weight.view(R, 3 * H)).view(3 * R, H)
        b = torch.sparse.mm(self.kernel, self.out.bias.view(R, 3)).view(3 * R)
        return h, self.scale * nn.functional.linear(h, w, b).view(len(z), R, 3)

    def displacement(self, z: Tensor) -> Tensor:
        """(B, zdim) -> (B, N, 3) Å from the starting model."""
        h, fine = self._fine(z)
        if self.rigid is not None:
            return self.rigid(h, fine)
        return fine if self.group is None else fine[:, self.group]

    @property
    def unit(self) -> Tensor:
        """(N,) each atom's unit: its residue (smoothed decoder) or itself."""
        return torch.arange(len(self.x0), device=self.x0.device) if self.group is None else self.group

    def units(self, z: Tensor) -> AffineUnits:
        """The structures of :meth:`forward` as affine maps of the units (B, U, 3, 4): atom n of structure b is
        at ``maps[b, unit[n]] @ (x0[n], 1)``. Renderers place the atoms themselves (``renderers.gaussian``), so
        a Gauss-Newton step or a search never builds (B, N, 3) arrays: U is the residue count, N the atoms'."""
        h, fine = self._fine(z)
        if self.rigid is not None:
            return AffineUnits(self.x0, self.unit, self.rigid.unit_motion(h, fine, identity=True))
        eye = torch.eye(3, dtype=fine.dtype, device=fine.device).expand(*fine.shape[:2], 3, 3)
        return AffineUnits(self.x0, self.unit, torch.cat([eye, fine[..., None]], -1))


class RigidBlocks(nn.Module):
    """Rigid blocks for :class:`AtomDecoder`: at each level, each chain is cut into blocks of about ``length``
    consecutive residues, and each block is turned by a rotation vector and moved by a translation decoded from
    the decoder's hidden features h (B, H).

    A residue's rigid motion blends its two nearest blocks' at each level (linearly in its position along the
    chain, so neighbouring residues never tear apart), and the levels add: an atom x moves by
    u = sum_j w_j ((R_j - I)(x - c_j) + t_j) + f, with c_j the block's centre in the starting model and f the
    decoder's own (smoothed) displacement of the atom's unit. Translations are in units of ``scale`` Å, rotations
    in units of scale / r_j radians (r_j the block's RMS radius), so that a unit moves the block's atoms about
    ``scale`` Å either way.

    Why: a residue's gradient from one particle image is mostly noise; the sum of a block's forces and torques over
    its residues is much less so. Measured on the 6FLR hinge (SNR 0.1, 256 far particles, a decoder at 60 % of the
    motion): the split-half agreement of the summed image gradient was 0.21 per residue and 0.35 for blocks of 20
    residues, and its cosine with the remaining motion 0.12 against 0.28. Trained for 10 minutes with each
    particle's latent set to its true coordinate, a decoder with blocks of 20 residues reached 98 % of the motion
    (0.42 Å from the truth at the far end), the decoder without blocks 60 % (2.6 Å).

    Args:
        x0: (N, 3) starting model, Å. residue: (N,) each atom's residue. chain: (R,) each residue's chain, residues
        in chain order. lengths: residues per block, one per level. unit: (N,) each atom's unit of the fine
        displacement f (its residue, or the atom itself). hidden: width of h. scale: Å per output unit.
    """

    def __init__(self, x0: Tensor, residue: Tensor, chain: Tensor, lengths: tuple[int, ...], unit: Tensor,
                 hidden: int, scale: float):
        super().__init__()
        blocks, weights, first = [], [], 0
        for k in lengths:
            b, w = chain_blocks(chain, k)  # (R, 2) each
            blocks.append(b + first), weights.append(w)
            first += int(b.max()) + 1
        S, U = first, int(unit.max()) + 1
        unit_res = torch.zeros(U, dtype=torch.long).index_copy_(0, unit, residue)  # each unit's residue
        block = torch.cat(blocks, 1)[unit_res]  # (U, 2 levels) blocks and weights of each unit
        weight = torch.cat(weights, 1)[unit_res].to(x0.dtype)
        # a unit's rigid motion is sum_s blend[u, s] A_s: two blocks per level (dense: one matrix product per batch)
        self.register_buffer("blend", torch.zeros(U, S, dtype=x0.dtype).scatter_add_(1, block, weight),
                             persistent=False)
        level0 = torch.zeros(S, dtype=torch.bool)
        level0[blocks[0].unique()] = True  # a unit's level-0 weights sum to 1: the identity rides on them
        self.register_buffer("level0", level0, persistent=False)
        with torch.sparse.check_sparse_tensor_invariants():  # checked once, here (as residue_kernel)
            # place (N, 4U): an atom's displacement is sum_k place[n, 4u + k] A_u[:, k], A_u = [M_u | a_u] (3, 4)
            N = len(x0)
            rows = torch.arange(N).repeat_interleave(4)
            cols = (4 * unit[:, None] + torch.arange(4)).flatten()
            vals = torch.cat([x0, torch.ones(N, 1, dtype=x0.dtype)], 1).flatten()
            self.register_buffer("place", torch.sparse_coo_tensor(
                torch.stack([rows, cols]), vals, (N, 4 * U)).coalesce(), persistent=False)
        # each block's centre and RMS radius in the starting model, over its atoms weighted by their blend
        wa = self.blend[unit]  # (N, S)
        mass = wa.sum(0)
        self.register_buffer("centre", (wa.T @ x0) / mass[:, None], persistent=False)  # (S, 3) Å
        r2 = (wa * ((x0[:, None] - self.centre[None]) ** 2).sum(-1)).sum(0) / mass
        self.register_buffer("radius", r2.sqrt().clamp_min(2.0), persistent=False)  # (S,) Å
        self.scale = scale
        self.out = nn.Linear(hidden, 6 * S)
        nn.init.normal_(self.out.weight, std=1e-3 / (scale * hidden**0.5))
        nn.init.zeros_(self.out.bias)

    def forward(self, h: Tensor, fine: Tensor) -> Tensor:
        """Hidden features (B, H) and the fine displacement of each unit (B, U, 3) Å -> displacements (B, N, 3) Å."""
        B = len(h)
        A = self.unit_motion(h, fine).permute(1, 3, 0, 2)  # (U, 4, B, 3): [unit, column k, batch, row i]
        u = torch.sparse.mm(self.place, A.reshape(-1, 3 * B))  # (N, 3B)
        return u.view(-1, B, 3).transpose(0, 1)

    def unit_motion(self, h: Tensor, fine: Tensor, identity: bool = False) -> Tensor:
        """Each unit's affine displacement (B, U, 3, 4): an atom x of unit u moves by ``A[:, u] @ (x, 1)`` Å; from
        hidden features (B, H) and fine displacements (B, U, 3) Å. ``identity``: plus [I | 0], the unit's map."""
        B = len(h)
        o = self.scale * self.out(h).view(B, -1, 6)
        M = axis_angle_to_matrix(o[..., 3:] / self.radius[:, None]) - torch.eye(3, dtype=h.dtype, device=h.device)
        a = o[..., :3] - (M @ self.centre[:, :, None])[..., 0]  # u = M x + a
        A = torch.cat([M, a[..., None]], -1)  # (B, S, 3, 4) per block
        if identity:
            A = A + self.level0[:, None, None] * torch.eye(3, 4, dtype=h.dtype, device=h.device)
        A = (self.blend @ A.reshape(B, len(self.blend.T), 12)).view(B, -1, 3, 4)  # (B, U, 3, 4) per unit
        A[..., 3] += fine  # the fine part: a translation
        return A


def chain_blocks(chain: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Cut each chain (``chain``: (R,) chain index of each residue, residues in chain order) into
    round(n / length) blocks (at least 1). Returns each residue's two nearest blocks (R, 2) int64 and their
    weights (R, 2), which sum to 1 and change linearly along the chain between block centres."""
    block = torch.zeros(len(chain), 2, dtype=torch.long)
    weight = torch.zeros(len(chain), 2, dtype=torch.float32)
    first = 0
    for c in torch.unique(chain, sorted=True):
        idx = torch.nonzero(chain == c)[:, 0]
        n = len(idx)
        nb = max(1, round(n / length))
        u = (torch.arange(n, dtype=torch.float32) + 0.5) * nb / n - 0.5  # position in block units
        lo = u.floor().clamp(0, nb - 1)
        f = (u - lo).clamp(0, 1) * (lo < nb - 1)
        block[idx, 0] = first + lo.long()
        block[idx, 1] = first + (lo.long() + 1).clamp_max(nb - 1)
        weight[idx, 0], weight[idx, 1] = 1 - f, f
        first += nb
    return block, weight


def residue_kernel(x0: Tensor, groups: Tensor, width: float) -> Tensor:
    """(R, R) sparse row-stochastic smoothing kernel over the R residues of ``groups`` (N,): weights
    exp(-d^2 / (2 width^2)) between residue centres (mean atom positions of ``x0`` (N, 3) Å) closer than
    2.5 ``width`` Å, each row normalised to sum 1."""
    R = int(groups.max()) + 1
    count = torch.bincount(groups, minlength=R).to(x0.dtype)
    centres = torch.zeros(R, 3, dtype=x0.dtype).index_add_(0, groups, x0) / count[:, None]
    rows, cols, vals = [], [], []
    for start in range(0, R, 1024):  # memory O(1024 R), not O(R^2)
        d = torch.cdist(centres[start:start + 1024], centres)
        r, c = torch.nonzero(d < 2.5 * width, as_tuple=True)
        w = torch.exp(-d[r, c] ** 2 / (2 * width**2))
        rows.append(r + start), cols.append(c), vals.append(w)
    rows, cols, vals = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    vals = vals / torch.zeros(R, dtype=x0.dtype).index_add_(0, rows, vals)[rows]
    with torch.sparse.check_sparse_tensor_invariants():  # checked once, here (and no warning that it is not)
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (R, R)).coalesce()


class PoseEncoder(nn.Module):
    """Standardised images (B, 1, d, d) -> K rotation hypotheses (B, K, 3, 3) and shifts (B, K, 2) Å.

    A ``ConvEncoder`` whose 8K outputs (its two halves together) are, per hypothesis, a 6-D rotation
    (``rotation_6d_to_matrix``) and a shift in units of ``shift_unit`` Å.
    """

    def __init__(self, size: int, heads: int, width: int, shift_unit: float):
        super().__init__()
        self.net = ConvEncoder(1, size, 4 * heads, width=width)
        self.heads, self.shift_unit = heads, shift_unit

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = torch.cat(self.net(x), -1).view(len(x), self.heads, 8)
        return rotation_6d_to_matrix(out[..., :6]), out[..., 6:] * self.shift_unit


def pose_distance(R: Tensor, shift: Tensor, R_true: Tensor, shift_true: Tensor, apix: float) -> Tensor:
    """(B, K) squared chordal distance of K hypotheses to the true rotation (B, 3, 3), plus 0.02 per px²
    of shift error (so 1 px weighs about as much as 8 degrees)."""
    d_rot = ((R - R_true[:, None]) ** 2).sum((-1, -2))
    return d_rot + 0.02 * (((shift - shift_true[:, None]) / apix) ** 2).sum(-1)


class AtomVAE(nn.Module):
    """The atom VAE. ``loss(batch, step)`` follows the scene3d trainer's model interface.

    Args:
        cfg: :class:`AtomVAEConfig`.
        x0: (N, 3) starting-model coordinates, Å, centred on the box centre.
        amplitudes, sigmas: (N,) Gaussian mass and width (Å) of each modelled atom.
        bonds: (E, 2) bonded pairs of the starting model.
        box: image side (pixels); apix: pixel size (Å/px).
        n_particles: dataset size (for per-particle pose corrections).
        noise_sigma: pixel noise standard deviation of the images (image units).
        groups: (N,) residue index of each atom (``cryoem.structure.residue_groups``), for ``dec_smooth``;
            None: every atom its own residue.
        chains: (R,) chain index of each residue of ``groups``, for ``dec_rigid``; None: one chain.
    A batch is a dict with ``image`` (B, 1, D, D), ``R`` (B, 3, 3), ``shift_A`` (B, 2) Å,
    ``ctf`` (B, 9) (``CTFParams.as_tensor``) and ``index`` (B,).
    """

    kind = "atom-vae"  # run kind (config.json)

    def __init__(self, cfg: AtomVAEConfig, x0: Tensor, amplitudes: Tensor, sigmas: Tensor, bonds: Tensor,
                 box: int, apix: float, n_particles: int, noise_sigma: float, groups: Tensor | None = None,
                 chains: Tensor | None = None):
        super().__init__()
        if cfg.likelihood not in ("gaussian", "correlation"):
            raise SettingError("likelihood", f"expected gaussian or correlation, got {cfg.likelihood!r}")
        if cfg.posterior not in ("laplace", "amortized"):
            raise SettingError("posterior", f"expected laplace or amortized, got {cfg.posterior!r}")
        if cfg.posterior == "laplace" and cfg.likelihood != "gaussian":
            raise SettingError("likelihood", "correlation has no Laplace posterior; use it with posterior amortized")
        for name in ("w_bond", "w_local", "w_clash", "w_linear"):
            if not getattr(cfg, name) >= 0:
                raise SettingError(name, f"{getattr(cfg, name)} is negative; a weight must be 0 (off) or more")
        self.cfg, self.box, self.apix = cfg, int(box), float(apix)
        x0 = x0.float()
        self.enc_pool = cfg.enc_downsample or enc_pooling(self.box)
        if cfg.enc_downsample < 0 or self.box % self.enc_pool:
            raise SettingError("enc_downsample", f"{cfg.enc_downsample} must divide the box size {self.box}")
        channels = 2 if cfg.enc_reference else 1
        self.encoder = ConvEncoder(channels, self.box // self.enc_pool, cfg.zdim, width=cfg.enc_width)
        self.decoder = AtomDecoder(x0, cfg.zdim, cfg.dec_hidden, cfg.dec_layers, cfg.dec_scale, groups, cfg.dec_smooth,
                                   chains, cfg.dec_rigid)
        self.register_buffer("amplitudes", amplitudes.float())
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("noise_sigma", torch.tensor(float(noise_sigma)))
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.prior = StructuralPrior.from_model(x0, bonds, cfg.local_radius, cfg.clash_threshold)
        for k in ("bonds", "bond_d0", "local", "local_d0", "clash_pairs"):
            self.register_buffer(f"prior_{k}", getattr(self.prior, k), persistent=False)
        # laplace: each particle's latest posterior mean, where its next Gauss-Newton step starts (see warm_start)
        self.register_buffer("z_last", torch.zeros(n_particles, cfg.zdim))
        self.register_buffer("z_seen", torch.zeros(n_particles, dtype=torch.bool))
        # how many re-expressions (whiten) there had been at each particle's last visit, and in all (see fresh)
        self.register_buffer("z_visit", torch.zeros(n_particles, dtype=torch.int32))
        self.register_buffer("n_whiten", torch.zeros((), dtype=torch.int64))
        # the prior N(0, diag(prior_var)); set with the latent's coordinates by whiten (1 until then)
        self.register_buffer("prior_var", torch.ones(cfg.zdim))
        # particle_nuisance: each particle's latest (log contrast, B-factor Å²), relative to the model's
        self.register_buffer("nuisance", torch.zeros(n_particles, 2))
        fy = torch.fft.fftfreq(self.box, d=self.apix)
        fx = torch.fft.rfftfreq(self.box, d=self.apix)
        self.register_buffer("k2", fy[:, None] ** 2 + fx[None] ** 2, persistent=False)  # (D, D//2+1), 1/Å²
        # coarse_search: one Gaussian per decoder unit (residue), for the search's renderings
        for k, v in zip(("points", "amplitudes", "sigmas"), merge_units(x0, self.decoder.unit, self.amplitudes,
                                                                          self.sigmas)):
            self.register_buffer(f"coarse_{k}", v, persistent=False)
        self.pose_delta = nn.Embedding(n_particles, 5) if cfg.refine_poses else None
        if self.pose_delta is not None:
            nn.init.zeros_(self.pose_delta.weight)
        self.pose_encoder = None
        if cfg.infer_poses:
            if cfg.pose_heads < 1:
                raise SettingError("pose_heads", f"expected at least 1, got {cfg.pose_heads}")
            self.pose_encoder = PoseEncoder(self.box // self.enc_pool, cfg.pose_heads, cfg.enc_width,
                                            self.apix)

    # ----------------------------------------------------------------- parts
    def encode(self, batch: dict) -> tuple[Tensor, Tensor]:
        """A batch's images (B, 1, D, D) -> mu, logvar (B, zdim). Each image is standardised first.

        With ``enc_reference`` the encoder's second channel is the starting model rendered at the
        particle's pose and CTF (needs the batch's R, shift_A, ctf), in the image's standardised units.
        """
        batch = self.with_poses(batch)
        mu, logvar = self._encode(batch)
        if self.cfg.posterior == "laplace":
            mu, precision, _ = self.laplace(batch, self.search(batch, self.warm_start(batch, mu)))
            return mu, torch.linalg.inv(precision).diagonal(dim1=-2, dim2=-1).log()
        return mu, logvar

    @torch.no_grad()
    def posterior_mean(self, batch: dict, samples: int = POSTERIOR_SAMPLES) -> Tensor:
        """Each particle's posterior mean (B, zdim): the Laplace approximation as :meth:`encode` finds it, then
        self-normalised importance sampling (:meth:`importance_mean`). Without the Laplace posterior, the encoder's
        mean."""
        if self.cfg.posterior != "laplace":
            return self.encode(batch)[0]
        batch = self.with_poses(batch)
        guess, _ = self._encode(batch)
        mu, precision, nu = self.laplace(batch, self.search(batch, self.warm_start(batch, guess)))
        return self.importance_mean(batch, mu, precision, nu, samples)

    @torch.no_grad()
    def importance_mean(self, batch: dict, mu: Tensor, precision: Tensor, nuisance: Tensor | None,
                        samples: int = POSTERIOR_SAMPLES, chunk: int = 512) -> Tensor:
        """E[z | image] (B, zdim) by self-normalised importance sampling, from the Laplace mode ``mu`` (B, K), its
        precision A (B, K, K) and the particles' nuisance (B, 2) or None.

        The proposal is an equal mixture of N(mu, A^-1) and N(mu, A_t^-1), A_t = (A - P) / ``TEMPER`` + P (P the
        prior's precision): the likelihood tempered, so that the second component is wider where the image decides
        and as wide as the prior where it does not. Each of ``samples`` draws is rendered at the particle's pose,
        CTF and nuisance; its weight is the likelihood times the prior over the proposal's density. The draws are
        quasi-random (scrambled Sobol points, seeded, so that encoding is repeatable). ``chunk``: images rendered
        at once.

        Why: the Laplace mode is the mode of one local maximum, and along a weakly determined motion the posterior
        is wide, skewed or has several maxima. Measured on the two-hinge case after 10 minutes (600 particles, R²
        of each true hinge coordinate from the latents): Laplace modes 0.948 / 0.622; the posterior mean by
        quadrature over a 25 x 25 grid of the latent's two leading axes 0.961 / 0.746; this estimate with 16, 32 and
        64 draws 0.950 / 0.623, 0.953 / 0.689 and 0.958 / 0.680 (with 256 draws over the two axes alone, on 300 of
        the particles, 0.960 / 0.752 where the grid gave 0.959 / 0.749). On the morph at SNR 0.01 (30 minutes),
        R² 0.684 against 0.725 with 64 draws. Those were pseudo-random draws; quasi-random ones gave B 0.703, 0.719
        and 0.722 (two scrambles), 0.691 and 0.723 with 16, 32, 64 and 128 draws, and over all 8,000 particles
        0.740 against 0.703. A draw costs one rendering. Maxima much sharper than their distance apart are not
        averaged: the draws stay near the one the Laplace approximation sits on (the search's job).
        """
        B, K = mu.shape
        dt = torch.float64
        P = torch.diag(1 / self.prior_var.to(dt))
        A = 0.5 * (precision.to(dt) + precision.to(dt).transpose(1, 2))
        L = torch.stack([torch.linalg.cholesky(A), torch.linalg.cholesky((A - P) / TEMPER + P)], 1)  # (B, 2, K, K)
        # quasi-random standard normal draws (scrambled Sobol points through the normal quantile), the same for
        # every particle; the first half for the first component, the second half for the second
        u = torch.quasirandom.SobolEngine(K, scramble=True, seed=0).draw(samples, dtype=dt).clamp(1e-9, 1 - 1e-9)
        eps = torch.special.ndtri(u).to(mu.device)[None, :, :, None].expand(B, -1, -1, -1)
        which = (torch.arange(samples, device=mu.device) >= samples // 2).long()
        z = mu.to(dt)[:, None] + torch.linalg.solve_triangular(L[:, which].transpose(-1, -2), eps, upper=True)[..., 0]
        d = z[:, :, None] - mu.to(dt)[:, None, None]  # (B, S, 2, K)
        y = (d[..., None, :] @ L[:, None])[..., 0, :]  # (z - mu)^T L for each component
        log_det = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # (B, 2): log det(A)^1/2
        log_q = torch.logsumexp(-0.5 * (y**2).sum(-1) + log_det[:, None], 2) - math.log(2)
        log_prior = -0.5 * (z**2 / self.prior_var.to(dt)).sum(-1)
        nll = torch.empty(B, samples, dtype=dt, device=mu.device)
        per = max(1, chunk // samples)

        def rep(t: Tensor | None, j: slice) -> Tensor | None:
            return None if t is None else t[j].repeat_interleave(samples, 0)

        for i in range(0, B, per):
            j = slice(i, i + per)
            img = self.render(self.decoder.units(z[j].reshape(-1, K).to(mu.dtype)), rep(batch["R"], j),
                              rep(batch["shift_A"], j), rep(batch["ctf"], j), rep(batch.get("index"), j), None,
                              rep(nuisance, j))
            nll[j] = self.reconstruction(rep(batch["image"], j), img, None).to(dt).view(-1, samples)
        w = torch.softmax(-nll + log_prior - log_q, 1)
        return (w[..., None] * z).sum(1).to(mu.dtype)

    @torch.no_grad()
    def laplace(self, batch: dict, z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Laplace approximation of p(z | x): mean (B, zdim), precision (B, zdim, zdim) and the particles'
        nuisance (B, 2) or None, by ``gn_steps`` Gauss-Newton steps from ``z``.

        With J = d model image / dz (B, zdim, pixels): the decoder's displacements by finite differences, pushed
        through the projector in forward mode (:meth:`render_jvp`: one pass for the image and all zdim derivatives),
        residual r = image - model(z), noise sigma s and the prior N(0, P^-1) (P = diag(1 / ``prior_var``)),
        the linearised log posterior has precision A = J J^T / s^2 + P and its maximum at
        z + A^-1 (J r / s^2 - P z).

        With ``particle_nuisance`` the step also estimates each particle's log contrast c and B-factor B
        (Å², the image's Fourier envelope exp(c - B k^2 / 4)) under the priors N(0, NUISANCE_STD^2), from their
        analytic Jacobians (the model image itself, and -k^2 / 4 times it), which cost no rendering. The latent's
        precision is then that of its marginal (the Schur complement). Why: images differ in contrast and blur
        (ice, defocus-dependent envelope, radiation damage); without these two numbers the latent spent its
        dimensions on them instead of on the motion.

        This is the posterior of the model itself (KL weight 1), whatever ``beta`` is. Measured: with the
        posterior tempered by beta = 1 / zdim, every latent dimension that the motion did not need fitted noise
        and model mismatch (posterior-mean variance 1-2), and the motion was no longer latent PC1.
        """
        B, K = z.shape
        steps = 0.01 * self.prior_var.to(z.dtype).sqrt()  # 0.01 of the prior's std (float32: still ~1e-4 precise)
        index = batch.get("index")
        nu = self.stored_nuisance(index)
        prec = 1 / self.prior_var.to(z.dtype)
        if nu is not None:
            prec = torch.cat([prec, z.new_tensor(NUISANCE_STD) ** -2])
        P = torch.diag(prec)
        s2 = self.noise_sigma**2
        A = P
        for _ in range(max(1, self.cfg.gn_steps)):
            zz = torch.cat([z[:, None], z[:, None] + torch.diag(steps)], 1).reshape(B * (K + 1), K)
            maps = self.decoder.units(zz).maps.reshape(B, K + 1, -1, 3, 4)  # each unit's map (no (B, N, 3) arrays)
            tangents = (maps[:, 1:] - maps[:, :1]) / steps[:, None, None, None]  # (B, K, U, 3, 4) per unit of z_k
            units = AffineUnits(self.decoder.x0, self.decoder.unit, maps[:, 0])
            m, J = self.render_jvp(units, tangents, batch["R"], batch["shift_A"], batch["ctf"], index, nu)
            m, J = m.reshape(B, -1), J.reshape(B, K, -1)
            theta = z if nu is None else torch.cat([z, nu.to(z.dtype)], 1)
            if nu is not None:
                m0 = m.reshape(B, self.box, self.box)
                dB = torch.fft.irfft2(torch.fft.rfft2(m0) * (-self.k2 / 4), s=m0.shape[-2:])
                J = torch.cat([J, m0.reshape(B, 1, -1), dB.reshape(B, 1, -1)], 1)
            r = batch["image"].reshape(B, -1) - m
            A = J @ J.transpose(1, 2) / s2 + P
            theta = theta + torch.linalg.solve(A, (J @ r[..., None])[..., 0] / s2 - theta * prec)
            z = theta[:, :K]
            if nu is not None:
                nu = theta[:, K:]
        if nu is not None:  # the latent's marginal precision: A_zz - A_zn A_nn^-1 A_nz
            A = A[:, :K, :K] - A[:, :K, K:] @ torch.linalg.solve(A[:, K:, K:], A[:, K:, :K])
        return z, A, nu

    def warm_start(self, batch: dict, guess: Tensor) -> Tensor:
        """Where each particle's Gauss-Newton steps start (B, zdim): its posterior mean from its last training
        step (``z_last``) when it has one, else the encoder's ``guess`` (B, zdim).

        Why: one Gauss-Newton step from a poor start does not reach the posterior mode, and the decoder then
        learnt from latents that were too small, which made it steeper, which made the next steps fall shorter
        still: the motion ended up in the latent direction of least spread. Restarting from the last mean
        converges each particle's posterior over the epochs at no extra cost (like incremental EM).
        """
        index = batch.get("index")
        if index is None or not self.cfg.warm_start:
            return guess
        seen = self.fresh()[index]
        return torch.where(seen[:, None], self.z_last[index], guess)

    def fresh(self) -> Tensor:
        """(N,) bool: the particles whose stored mean (``z_last``) is still usable, those visited at most
        ``MAX_STALE_WHITENS`` re-expressions ago (see :meth:`whiten`).

        Why: a stored mean is mapped through every re-expression, so that it decodes to the same structure, but the
        decoder goes on learning, and as it grows steeper each re-expression scales the latent up. Measured after
        one epoch of 10^6 particles (15,625 steps, 156 re-expressions): the means of particles visited up to 9
        re-expressions before the end sat a median 0.9-1.0 prior standard deviations from 0 (the largest
        coordinate); 10-19 before, 1.4; 20-49, 3.9; 50-99, 25; 100-156, 2,200, and their decoded models were
        garbage. With 8,000 particles every particle is revisited within 2-3 re-expressions."""
        return self.z_seen & (self.n_whiten - self.z_visit <= MAX_STALE_WHITENS)

    @torch.no_grad()
    def search(self, batch: dict, z: Tensor) -> Tensor:
        """The most probable start for each particle's Gauss-Newton steps (B, zdim): of its warm start ``z``
        (B, zdim) and the stored posterior means of ``search`` other particles drawn at random, the one with the
        highest log posterior (the image's log-likelihood plus the log prior), each
        rendered at the particle's pose, CTF and stored nuisance.

        Why: a particle's log posterior along the latent often has more than one maximum (the same image fits
        a domain turned a little one way or the other), and Gauss-Newton steps only climb the one they start in.
        Measured on the 6FLR hinge after 10 minutes (blocks of 20 residues, 1,000 particles, a grid of 41 points
        along latent PC1): half the particles had two or more maxima, one in ten sat more than 0.9 prior standard
        deviations from its best, and the grid's best ordered the particles with |rho| 0.90 where the stored
        means gave 0.81. Other particles' means sample where the particles are (both states of a bimodal
        motion), at the cost of ``search`` renderings per particle, without derivatives. One pass over the
        particles from those stored means, searching 2, 4 or 8 others, gave |rho| 0.86, 0.88 and 0.89 (two passes
        0.88, 0.89, 0.89); 4 is the default. Outside training the draws are seeded, so that encoding is
        repeatable.

        With ``coarse_search`` each candidate is rendered with one Gaussian per residue (:meth:`gaussians`), and
        the Gauss-Newton step that follows renders the atoms. Measured on two hinge runs (256 particles, 5
        candidates each): it picked the atoms' best candidate for 84 % and 95 % of the particles, and where it
        did not, the pick was worse by 0.15-0.26 nats on average (the candidates spanned 27-30 nats); a training
        step took 0.47 s instead of 0.58 s. At finer sampling, where a residue's shape shows more (the same
        decoder's atoms rendered at SNR 0.1, 128 px at 1 Å/px and 256 px at 0.8 Å/px), it agreed for 91 % and 93 %.
        """
        G = self.cfg.search
        seen = torch.nonzero(self.fresh())[:, 0]
        if G <= 0 or len(seen) == 0:
            return z
        B, K = z.shape
        gen = None if self.training else torch.Generator(device=seen.device).manual_seed(0)
        pick = seen[torch.randint(len(seen), (B, G), generator=gen, device=seen.device)]
        cand = torch.cat([z[:, None], self.z_last[pick].to(z.dtype)], 1)  # (B, G + 1, K)
        C = cand.shape[1]

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(C, 0)

        index = batch.get("index")
        nu = self.stored_nuisance(index)
        img = self.render(self.decoder.units(cand.reshape(B * C, K)), rep(batch["R"]), rep(batch["shift_A"]),
                          rep(batch["ctf"]), rep(index), None, rep(nu), coarse=self.cfg.coarse_search)
        nll = self.reconstruction(rep(batch["image"]), img, None).view(B, C)
        log_post = -nll - 0.5 * (cand**2 / self.prior_var.to(z.dtype)).sum(-1)
        return cand[torch.arange(B, device=z.device), log_post.argmax(1)]

    @torch.no_grad()
    def _remember(self, batch: dict, mu: Tensor, nuisance: Tensor | None = None) -> None:
        """Store the batch's posterior means (B, zdim) for :meth:`warm_start`, and its nuisance (B, 2) for
        :meth:`stored_nuisance`; under DDP, every rank's."""
        index = batch.get("index")
        if index is None:
            return
        parts = [index, mu] + ([] if nuisance is None else [nuisance])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            gathered = []
            for x in parts:
                xs = [torch.empty_like(x) for _ in range(world)]
                torch.distributed.all_gather(xs, x.contiguous())
                gathered.append(torch.cat(xs))
            parts = gathered
        index = parts[0]
        self.z_last[index] = parts[1].to(self.z_last.dtype)
        self.z_seen[index] = True
        self.z_visit[index] = self.n_whiten.to(self.z_visit.dtype)
        if nuisance is not None:
            self.nuisance[index] = parts[2].to(self.nuisance.dtype)

    def _standardise(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 1, D, D) -> zero mean, unit variance per image; and the std (B, 1, 1, 1)."""
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        std = images.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
        return (images - mean) / std, std

    def _encode(self, batch: dict) -> tuple[Tensor, Tensor]:
        images = batch["image"]
        x, std = self._standardise(images)
        if self.cfg.enc_reference:
            with torch.no_grad():
                x0 = self.decoder.x0.expand(len(images), -1, -1)
                ref = self.render(x0, batch["R"], batch["shift_A"], batch["ctf"], batch.get("index"))
            x = torch.cat([x, (ref - ref.mean(dim=(1, 2, 3), keepdim=True)) / std], 1)
        if self.enc_pool > 1:
            x = torch.nn.functional.avg_pool2d(x, self.enc_pool)
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """(B, zdim) -> (B, N, 3) coordinates in Å."""
        return self.decoder(z)

    # ----------------------------------------------------------- pose inference
    def _pose_input(self, images: Tensor) -> Tensor:
        x = self._standardise(images)[0]
        return torch.nn.functional.avg_pool2d(x, self.enc_pool) if self.enc_pool > 1 else x

    @torch.no_grad()
    def infer_poses(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(B, 3, 3) rotations and (B, 2) Å shifts: of the pose encoder's hypotheses for each image, the one
        whose rendering of the mean model (z = 0) is closest to the image."""
        img = batch["image"]
        B, K = len(img), self.cfg.pose_heads
        R, shift = self.pose_encoder(self._pose_input(img))
        if K > 1:
            coords = self.decode(img.new_zeros(1, self.cfg.zdim)).expand(B * K, -1, -1)
            model = self.render(coords, R.reshape(B * K, 3, 3), shift.reshape(B * K, 2),
                                batch["ctf"].repeat_interleave(K, 0))
            err = ((model.reshape(B, K, -1) - img.reshape(B, 1, -1)) ** 2).sum(-1)
            best = err.argmin(1)
        else:
            best = torch.zeros(B, dtype=torch.long, device=img.device)
        pick = torch.arange(B, device=img.device)
        return R[pick, best], shift[pick, best]

    def with_poses(self, batch: dict) -> dict:
        """The batch with ``R`` and ``shift_A`` inferred by the pose encoder (``infer_poses``), else as given."""
        if self.pose_encoder is None:
            return batch
        R, shift = self.infer_poses(batch)
        return {**batch, "R": R, "shift_A": shift}

    def pose_loss(self, batch: dict) -> Tensor:
        """Winner-takes-all pose error on views simulated from the current model (the sleep phase), scalar."""
        ctf = batch["ctf"]
        B, dev = len(ctf), ctf.device
        R = random_rotations(B, None).to(dev, torch.float32)
        shift = torch.randn(B, 2, device=dev) * self.cfg.pose_shift_px * self.apix
        with torch.no_grad():
            coords = self.decode(torch.randn(B, self.cfg.zdim, device=dev) * self.prior_var.sqrt())
            img = self.render(coords, R, shift, ctf[torch.randperm(B, device=dev)])
            img = img + self.noise_sigma * torch.randn_like(img)
        R_hat, shift_hat = self.pose_encoder(self._pose_input(img))
        return pose_distance(R_hat, shift_hat, R, shift, self.apix).min(1).values.mean()

    def pose(self, R: Tensor, shift: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The batch's rotations (B, 3, 3) and shifts (B, 2) Å, with the learned corrections when enabled."""
        if self.pose_delta is not None and index is not None:
            d = self.pose_delta(index)
            R = axis_angle_to_matrix(0.1 * d[:, :3]) @ R  # 0.1: radians per unit, keeps Adam steps small
            shift = shift + d[:, 3:5]
        return R, shift

    def gaussians(self, coords: Tensor | AffineUnits, coarse: bool = False) -> tuple[Tensor | AffineUnits, Tensor,
                                                                                       Tensor]:
        """What the projector splats: ``coords`` with the atoms' masses and widths (N,); with ``coarse``, the
        decoder units' merged Gaussians (``renderers.gaussian.merge_units``: one per residue) moved by the maps of
        ``coords`` (an :class:`AffineUnits`), with their masses and widths (U,)."""
        if not coarse:
            return coords, self.amplitudes, self.sigmas
        if not isinstance(coords, AffineUnits):
            raise TypeError("coarse rendering needs the decoder's units (AtomDecoder.units), not coordinates")
        unit = torch.arange(len(self.coarse_points), device=self.coarse_points.device)
        return AffineUnits(self.coarse_points, unit, coords.maps), self.coarse_amplitudes, self.coarse_sigmas

    def render(self, coords: Tensor | AffineUnits, R: Tensor, shift: Tensor, ctf: Tensor, index: Tensor | None = None,
               step: int | None = None, nuisance: Tensor | None = None, coarse: bool = False) -> Tensor:
        """Model images (B, 1, D, D): projection of ``coords`` (B, N, 3) Å or of the decoder's
        :meth:`AtomDecoder.units` (``coarse``: one Gaussian per unit, :meth:`gaussians`), CTF, scale (and the
        curriculum).

        ``nuisance`` (B, 2): per-image log contrast and B-factor (Å²), applied as ``exp(c - B k^2 / 4)``
        in Fourier space (k in 1/Å); None: the particles' stored ones (:meth:`stored_nuisance`).
        """
        R, shift = self.pose(R, shift, index)
        proj = project(*self.gaussians(coords, coarse), R, self.apix, self.box, shift)
        c = ctf_2d(CTFParams.from_tensor(ctf), self.box, self.apix, dtype=proj.dtype, device=proj.device)
        c = c * self.lowpass(step) * self.envelope(self.stored_nuisance(index) if nuisance is None else nuisance)
        return torch.exp(self.log_scale) * fourier_filter(proj, self.apix, None, c)

    @torch.no_grad()
    def render_jvp(self, coords: Tensor | AffineUnits, tangents: Tensor, R: Tensor, shift: Tensor, ctf: Tensor,
                   index: Tensor | None = None, nuisance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`render` of ``coords`` (B, N, 3) and its derivatives along ``tangents`` (B, K, N, 3) (Å per unit),
        or of :class:`AffineUnits` and tangent maps (B, K, U, 3, 4):
        model images (B, 1, D, D) and (B, K, D, D), through the same pose, CTF, nuisance and scale (no curriculum)."""
        R, shift = self.pose(R, shift, index)
        img, jvp = project_jvp(coords, tangents, self.amplitudes, self.sigmas, R, self.apix, self.box, shift)
        c = ctf_2d(CTFParams.from_tensor(ctf), self.box, self.apix, dtype=img.dtype, device=img.device)
        c = c * self.envelope(self.stored_nuisance(index) if nuisance is None else nuisance)
        out = torch.fft.irfft2(torch.fft.rfft2(torch.cat([img, jvp], 1)) * c[:, None], s=img.shape[-2:])
        out = torch.exp(self.log_scale) * out
        return out[:, :1], out[:, 1:]

    def stored_nuisance(self, index: Tensor | None) -> Tensor | None:
        """The particles' latest (log contrast, B-factor) (B, 2), or None (no index, or ``particle_nuisance`` off)."""
        if index is None or not self.cfg.particle_nuisance or self.cfg.posterior != "laplace":
            return None
        return self.nuisance[index]

    def envelope(self, nuisance: Tensor | None) -> Tensor | float:
        """``exp(c - B k^2 / 4)`` (B, D, D//2+1) of per-image nuisance (B, 2) = (c, B Å²); 1 for None."""
        if nuisance is None:
            return 1.0
        nu = nuisance.to(self.k2.dtype)
        return torch.exp(nu[:, :1, None] - nu[:, 1:, None] * self.k2 / 4)

    def lowpass(self, step: int | None) -> Tensor | float:
        """Soft low-pass filter (D, D//2+1) of the resolution curriculum at ``step`` (1 when off or done)."""
        c = self.cfg
        if c.lowpass_start is None or step is None or step >= c.curriculum_steps:
            return 1.0
        nyq = 2 * self.apix
        res = c.lowpass_start + (nyq - c.lowpass_start) * step / c.curriculum_steps  # Å
        fy = torch.fft.fftfreq(self.box, d=self.apix, device=self.log_scale.device)
        fx = torch.fft.rfftfreq(self.box, d=self.apix, device=self.log_scale.device)
        f = torch.sqrt(fy[:, None] ** 2 + fx[None] ** 2)
        return torch.exp(-math.log(2) * (f * res) ** 2)  # half amplitude at frequency 1 / res

    def prior_weights(self) -> dict[str, float]:
        """Nats per image per unit of each :meth:`prior_terms` term, as the loss adds them: the term's ``w_*`` times
        the pixel count / 1000, so that the weights keep their meaning across box sizes.

        The local-distance and clash weights default to 0.1. At 1, the true structures of the far states of the
        three development cases probed (``scripts/prior_probe.py``) cost more under the priors (9-138 nats per
        image; a real hinge or morph changes the distances across it) than they gained over the decoded models in
        the images (7-28 nats), and the decoder stopped short of the motion (RMSD ratios 0.58-0.84).

        At 0.1 the clash term still holds the simulated hinge short (its rigid far states clash: 11.7 nats per
        image, against 7.9 gained in the images), and without it the hinge's RMSD ratio fell from 0.42 to 0.36.
        It stays on: without it the decoded models clashed (summed overlap² 15-50 Å², against 0.02-0.6 with it) at
        SNR 0.01 and on the hinge, and a real motion's end states do not clash.
        """
        per = self.box * self.box / 1000
        return {"bond": self.cfg.w_bond * per, "local": self.cfg.w_local * per, "clash": self.cfg.w_clash * per,
                "linear": self.cfg.w_linear * per}

    def nonlinearity(self, z: Tensor, coords: Tensor) -> Tensor:
        """How far the decoder is from linear in z where the latents lie: the mean squared atom deviation (Å²)
        of the structure decoded at the midpoint of two of the batch's latents ``z`` (B, K) from the mean of their
        two structures ``coords`` (B, N, 3), over the B pairs (each latent with the one half a batch away).

        Added to the loss with weight ``w_linear`` (default 10, as the priors: times the pixel count / 1000). Why:
        the decoder MLP can bend the latent. A hinge run annealed over 20 minutes learnt the motion in its decoded
        structures, but they were no longer linear in z (this term 0.44 Å², against 0.02 after 10 minutes), the
        latent folded and latent PC1 ordered the particles with |rho| 0.30. With the term at weight 10, the same
        run ended at 0.86. A real rotation's own curvature costs little: the development hinge's true path scores
        0.018 Å² (0.75 nats per 64 px image at weight 10), two hinges 0.031 Å²."""
        pair = torch.roll(torch.arange(len(z), device=z.device), len(z) // 2)
        mid = self.decoder(0.5 * (z + z[pair]))
        return ((mid - 0.5 * (coords + coords[pair])) ** 2).sum(-1).mean()

    def prior_terms(self, coords: Tensor) -> dict[str, Tensor]:
        p = StructuralPrior(self.prior_bonds, self.prior_bond_d0, self.prior_local, self.prior_local_d0,
                            self.prior_clash_pairs, self.cfg.clash_threshold)
        return p(coords)

    # ------------------------------------------------------------------ loss
    def check_batch(self, batch: dict) -> None:
        img = batch["image"]
        if img.dim() != 4 or img.shape[1:] != (1, self.box, self.box):
            raise UserError(f"particles: images are {tuple(img.shape[1:])}, the model expects (1, {self.box}, "
                            f"{self.box})")

    def reconstruction(self, image: Tensor, model: Tensor, step: int | None) -> Tensor:
        """Per-image negative log-likelihood (nats) or scaled correlation loss, (B,)."""
        n = image.shape[-1] * image.shape[-2]
        lp = self.lowpass(step)
        if not isinstance(lp, float):
            image = torch.fft.irfft2(torch.fft.rfft2(image[:, 0]) * lp, s=image.shape[-2:])[:, None]
        if self.cfg.likelihood == "correlation":
            a = image.flatten(1) - image.flatten(1).mean(1, keepdim=True)
            b = model.flatten(1) - model.flatten(1).mean(1, keepdim=True)
            corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
            return n * (1 - corr)
        return ((image - model) ** 2).flatten(1).sum(1) / (2 * self.noise_sigma**2)

    def loss(self, batch: dict, step: int) -> dict[str, Tensor]:
        img = batch["image"]
        if self.pose_encoder is not None and step < self.cfg.pose_warmup:  # poses first, then the model
            pose = self.pose_loss(batch)
            nan = pose.new_tensor(float("nan"))  # the model's terms are not computed yet; keeps the log's columns
            return {"loss": self.cfg.pose_weight * pose, **dict.fromkeys(("rec", "kl", "bond", "local", "clash")
                                                                  + ("linear",) * (self.cfg.w_linear > 0), nan),
                    "scale": torch.exp(self.log_scale).detach(), "pose": pose.detach()}
        batch = self.with_poses(batch)
        c = self.cfg
        mu, logvar = self._encode(batch)
        enc_fit, nuisance = None, None
        if c.posterior == "laplace":  # the encoder learns to predict the Laplace posterior it starts from
            mu_enc, logvar_enc = mu, logvar
            mu, precision, nuisance = self.laplace(batch, self.search(batch, self.warm_start(batch, mu_enc.detach())))
            z, kl = sample_precision(mu, precision, self.prior_var)
            cov = torch.linalg.inv(precision)
            logvar = cov.diagonal(dim1=-2, dim2=-1).log()
            if self.training:
                self._accumulate(mu, cov)
                self._remember(batch, mu, nuisance)
            enc_fit = -gaussian_log_likelihood(mu, mu_enc, torch.exp(0.5 * logvar_enc)).mean()
        else:
            z, kl = reparameterize(mu, logvar), gaussian_kl(mu, logvar)
        coords = self.decode(z)
        model = self.render(coords, batch["R"], batch["shift_A"], batch["ctf"], batch.get("index"), step, nuisance)
        rec_i = self.reconstruction(img, model, step)
        rec = rec_i.mean()
        kl = kl.mean()
        pri = self.prior_terms(coords[: self.cfg.prior_samples])
        weight = self.prior_weights()
        beta = self.kl_weight() * min(1.0, step / max(c.kl_warmup, 1))
        if c.w_linear > 0:
            pri["linear"] = self.nonlinearity(z, coords)
        total = rec + beta * kl + sum(weight[k] * v for k, v in pri.items())
        out = {"rec": rec, "kl": kl, **pri, "scale": torch.exp(self.log_scale).detach(),
               **latent_use(mu, z, rec_i, batch, self, step)}
        if enc_fit is not None:
            out["enc_fit"] = enc_fit
            total = total + enc_fit
        if self.pose_encoder is not None:
            out["pose"] = self.pose_loss(batch)
            total = total + c.pose_weight * out["pose"]
        return {"loss": total, **out}

    def kl_weight(self) -> float:
        """The KL weight beta after warm-up (``beta``, default 1 / zdim)."""
        return 1.0 / self.cfg.zdim if self.cfg.beta is None else float(self.cfg.beta)

    # ------------------------------------------------- latent standardisation
    @torch.no_grad()
    def _accumulate(self, mu: Tensor, cov: Tensor) -> None:
        """Add a batch's posterior means (B, K) and covariances (B, K, K) to the aggregate-posterior sums."""
        second = (mu[:, :, None] * mu[:, None] + cov).sum(0).flatten()
        stats = torch.cat([mu.new_full((1,), len(mu)), mu.sum(0), second])
        old = getattr(self, "_latent_stats", None)
        self._latent_stats = stats if old is None else old + stats

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Trainer hook: every ``whiten_every`` steps, :meth:`whiten` from the posteriors since the last one.
        After ``WHITEN_EARLY_STEPS`` steps it also waits until 1 / ``WHITENS_PER_EPOCH`` of the particles have been
        visited since the last one.

        Why: on a large data set every particle is visited once per epoch, and a mean stored more than
        ``MAX_STALE_WHITENS`` re-expressions ago is stale (:meth:`fresh`). Re-expressing every 100 steps through an
        epoch of 10^6 particles (15,625 steps) left 97 % of them stale, and ``analyze`` spent 30 minutes encoding
        them again. Below about 26,000 particles (at batch 64) nothing changes. Measured on one epoch of 10^6
        particles: analyze took 2.3 minutes instead of 31, but the means stored in steps 1,000-4,900 ordered the
        particles less well than the final model does (|rho| 0.76 against 0.96), as the decoder was still changing
        fast; ``analyze --refine`` encodes every particle with the final model."""
        every = self.cfg.whiten_every
        stats = getattr(self, "_latent_stats", None)
        if not every or stats is None or step % every:
            return
        ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if ddp else 1
        if step > WHITEN_EARLY_STEPS and stats[0] * world < len(self.z_seen) / WHITENS_PER_EPOCH:
            return  # the same decision on every rank: equal batches per rank
        if ddp:  # one transform on every rank
            torch.distributed.all_reduce(stats)
        self._latent_stats = None
        K = self.cfg.zdim
        n, total, second = stats[0], stats[1:K + 1], stats[K + 1:].view(K, K)
        mean = total / n
        changed = self.whiten(mean, second / n - mean[:, None] * mean[None])
        for p in changed:  # Adam's moments were for the old coordinates
            optimizer.state.pop(p, None)

    @torch.no_grad()
    def whiten(self, mean: Tensor, cov: Tensor) -> list[nn.Parameter]:
        """Re-express the latent (PX-EM) so that its axes are the decoder's directions of structural change,
        largest first, and set the prior to the aggregate posterior, N(0, diag(``prior_var``)).

        ``mean`` (K,) and ``cov`` (K, K): of the aggregate posterior, the sum of q(z | x) over particles, in the
        current coordinates. With cov = U diag(lam) U^T, z' = diag(lam)^-1/2 U^T (z - mean) has an aggregate
        posterior N(0, I). In z', G = the mean over particles of J^T J / N (J = d coordinates / dz', (3N, K),
        Å per unit; :meth:`structure_metric`) = V diag(g) V^T, and the new latent is
        z'' = diag(g / max g)^1/2 V^T z'. Then a unit step in any direction of z'' moves the atoms by the same RMS
        distance, and the aggregate posterior and the prior are N(0, diag(g / max g)): a direction that barely
        moves atoms has a small prior variance. The decoder's first layer absorbs z = T z'' + mean, so every
        decoded model stays the same; the encoder's mean head and the stored means (``z_last``) are mapped the
        same way. Returns the parameters changed.

        Why: the N(0, I) prior is redundant with the decoder's first layer (Liu, Rubin & Wu 1998, PX-EM), so
        nothing else sets the latent's scale. Measured: standardised to N(0, I), the dimensions that fitted noise
        with sub-Å displacements had nearly the variance of the motion's (eigenvalues 1.3 to 0.7), and latent
        PC1 ordered the particles by the motion with |rho| 0.45; PC1 of the decoded structures, 0.70 to 0.95.
        With the unscaled latent (before PX-EM) the motion sat in latent PC8 of 8.
        """
        lam, U = torch.linalg.eigh(0.5 * (cov + cov.T))
        lam = lam.clamp_min(1e-6)
        T = U * lam.sqrt()  # z = T z' + mean
        points = (self._latent_sample() - mean) @ (U / lam.sqrt())  # stored means, in z'
        g, V = torch.linalg.eigh(self.structure_metric(points, T, mean))
        g, V = g.flip(0), V.flip(1)  # largest structural change first
        var = (g / g[0].clamp_min(1e-30)).clamp(1e-4, 1.0)
        T = T @ V / var.sqrt()  # z = T z'' + mean
        T_inv = (var.sqrt()[:, None] * V.T) @ (U / lam.sqrt()).T  # z'' = T_inv (z - mean)
        first, head, K = self.decoder.mlp[0], self.encoder.head, self.cfg.zdim
        first.bias += first.weight @ mean
        first.weight.copy_(first.weight @ T)
        head.weight[:K] = T_inv @ head.weight[:K]
        head.bias[:K] = T_inv @ (head.bias[:K] - mean)
        self.z_last.copy_((self.z_last - mean) @ T_inv.T)
        self.prior_var.copy_(var)
        self.n_whiten += 1
        return [first.weight, first.bias, head.weight, head.bias]

    def _latent_sample(self, n: int = 128) -> Tensor:
        """Up to ``n`` stored posterior means (n, K), evenly spaced over the particles seen (the same on every
        DDP rank); the origin when none is stored."""
        seen = torch.nonzero(self.z_seen)[:, 0]
        if len(seen) == 0:
            return self.z_last.new_zeros(1, self.cfg.zdim)
        pick = seen[torch.linspace(0, len(seen) - 1, min(n, len(seen)), device=seen.device).long()]
        return self.z_last[pick]

    @torch.no_grad()
    def structure_metric(self, z: Tensor, T: Tensor | None = None, mean: Tensor | None = None) -> Tensor:
        """(K, K) Å² per unit²: the mean over latents ``z`` (S, K) of J^T J / N, J = d coordinates / dz (3N, K) by
        finite differences of the decoder, so that z^T G z is the mean squared atom displacement of a small step
        z. With ``T`` (K, K) and ``mean`` (K,), ``z`` is in coordinates where the decoder's input is T z + mean."""
        K = z.shape[1]
        T = torch.eye(K, dtype=z.dtype, device=z.device) if T is None else T
        mean = z.new_zeros(K) if mean is None else mean
        h, G = 0.01, z.new_zeros(K, K)
        for chunk in z.split(32):
            zz = torch.cat([chunk[:, None], chunk[:, None] + h * torch.eye(K, dtype=z.dtype, device=z.device)], 1)
            x = self.decoder(zz.reshape(-1, K) @ T.T + mean).reshape(len(chunk), K + 1, -1)
            J = (x[:, 1:] - x[:, :1]) / h  # (S, K, 3N)
            G += (J @ J.transpose(1, 2)).sum(0)
        return G / (len(z) * len(self.decoder.x0))

    @torch.no_grad()
    def init_scale(self, batch: dict) -> float:
        """Set the image scale by least squares between the data and the starting model's images.

        Without poses in the batch (``infer_poses``): from the signal power, at random views,
        (mean image power - noise sigma^2) / mean model power.
        """
        self.log_scale.zero_()
        img = batch["image"]
        coords = self.decoder.x0.expand(len(img), -1, -1)
        if "R" not in batch:
            R = random_rotations(len(img), None).to(img.device, img.dtype)
            m = self.render(coords, R, torch.zeros(len(img), 2, dtype=img.dtype, device=img.device), batch["ctf"])
            signal = (img.var(dim=(1, 2, 3)).mean() - self.noise_sigma**2).clamp_min(1e-12)
            return self._set_scale(torch.sqrt(signal / m.var(dim=(1, 2, 3)).mean().clamp_min(1e-12)))
        m = self.render(coords, batch["R"], batch["shift_A"], batch["ctf"])
        return self._set_scale((m * img).sum() / (m * m).sum().clamp_min(1e-12))

    def _set_scale(self, s: Tensor) -> float:
        if s <= 0:
            raise UserError("particles: the images anti-correlate with the starting model's projections; "
                            "check the contrast sign (invert the data) or the poses")
        self.log_scale.fill_(math.log(float(s)))
        return float(s)

    @classmethod
    def from_run(cls, run, device: str = "cpu") -> tuple["AtomVAE", dict]:
        """``plato_core.runinfo.load_run`` for atom-VAE runs: (model in eval mode, the run record ``model.json``).
        Reads no particle image; ``cryoem.train.load_run`` also gives the particles."""
        from cryoem.train import load_model  # the run record's reader lives beside its writer, the trainer

        model, rec, _ = load_model(run, device)
        return model, rec

    def run_settings(self) -> dict:
        """The settings the trainer records (config.json, checkpoint): ``{"model": AtomVAEConfig fields}``."""
        return {"model": asdict(self.cfg)}


NUISANCE_STD = (0.3, 50.0)  # prior std of a particle's log contrast and B-factor (Å²), see AtomVAE.laplace


def sample_precision(mu: Tensor, precision: Tensor, prior_var: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A sample of N(mu, precision^-1) (B, K), with the full covariance, and its KL (B,) nats to the prior
    N(0, diag(prior_var)) ((K,); None: N(0, I)).

    With precision A = L L^T (Cholesky) and v = prior_var, z = mu + L^-T eps has covariance A^-1, and
    KL = (sum_k (A^-1)_kk / v_k + sum_k mu_k^2 / v_k - K + log det A + sum_k log v_k) / 2.
    """
    v = torch.ones_like(mu[0]) if prior_var is None else prior_var.to(mu.dtype)
    L = torch.linalg.cholesky(precision)
    eps = torch.randn_like(mu)[..., None]
    z = mu + torch.linalg.solve_triangular(L.transpose(-1, -2), eps, upper=True)[..., 0]
    cov_trace = (torch.cholesky_inverse(L).diagonal(dim1=-2, dim2=-1) / v).sum(-1)
    logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1) + v.log().sum()
    return z, 0.5 * (cov_trace + (mu**2 / v).sum(-1) - mu.shape[-1] + logdet)


def latent_use(mu: Tensor, z: Tensor, rec: Tensor, batch: dict, model: AtomVAE, step: int) -> dict[str, Tensor]:
    """Is the latent used? Logged by ``loss`` (see ``plato_core.objective.active_units``).

    * ``au``: active units of the batch's posterior means ``mu`` (B, zdim), in units of the prior's std.
    * ``shuffle``: how much worse (nats per particle) the batch is reconstructed with its
      latents ``z`` permuted within the batch, against its own (``rec`` (B,)). Near 0 means the
      decoder ignores z. It costs one extra rendering, so it is computed only on the steps
      that the trainer logs (every 10th, its default ``log_every``) and is NaN elsewhere.
    """
    out = {"au": active_units(mu / model.prior_var.sqrt()).float()}  # relative to each dimension's prior
    if step != 0 and (step + 1) % 10:  # the trainer logs after steps 1, 10, 20, ...: loss steps 0, 9, 19, ...
        return {**out, "shuffle": mu.new_tensor(float("nan"))}
    with torch.no_grad():
        perm = torch.roll(torch.arange(len(z), device=z.device), 1)  # a derangement: no particle keeps its own z
        coords = model.decode(z[perm])
        other = model.render(coords, batch["R"], batch["shift_A"], batch["ctf"], batch.get("index"), step)
        out["shuffle"] = (model.reconstruction(batch["image"], other, step) - rec.detach()).mean()
    return out


COLLAPSE_SPREAD_A = 0.25  # decoded-structure spread (Å) below which the latent counts as unused


def collapse_warning(spread_A: float, shuffle_nats: float, active: float, zdim: int) -> str | None:
    """One line for the user when the latent moves (almost) no atom across particles, else None.

    ``spread_A``: the 95th percentile over atoms of each atom's RMS fluctuation (Å) across the structures
    decoded from the particles' posterior means. A decoder that fits only noise spreads atoms by about
    0.1 Å; one that learned a motion, even a weakly resolved one at SNR 0.01, by 0.35 Å or more.
    ``shuffle_nats`` and ``active`` (see ``latent_diagnostics``) are reported alongside. The shuffle cost
    depends on the box, the SNR and the noise fitted, so it does not separate the two cases.
    """
    if spread_A >= COLLAPSE_SPREAD_A:
        return None
    return (f"warning: the latent space has collapsed: the structures decoded from different particles differ "
            f"by at most {spread_A:.2f} Å (95th-percentile atom RMSF; a learned motion moves atoms by more than "
            f"{COLLAPSE_SPREAD_A:g} Å); {active:g} of {zdim} latent dimensions vary across particles, and "
            f"reconstructing each particle from another's latent costs {round(shuffle_nats, 2) + 0.0:.2f} nats. "
            f"The decoder has learned one mean structure and nothing per particle. Try: train longer; check that "
            f"the poses and CTF are right (cryoem check) and that the data hold a motion; or try a smaller --zdim.")


def latent_diagnostics(model: AtomVAE, ds, pool=None, n: int = 1024, batch_size: int = 128) -> dict:
    """Is the latent used? On up to ``n`` particles of ``ds`` (a fixed sample of the indices ``pool``,
    default all; ``ds.read_batch(idx)`` gives a batch):

    * ``kl_per_dim`` (zdim,): mean KL(q(z_d | x) || N(0, v_d)) in nats, v = the model's ``prior_var``;
    * ``active_units``: dimensions whose posterior mean varies across particles (variance > 0.01 v_d);
    * ``shuffle_nats``: mean increase of the reconstruction loss (nats per particle) when each particle is
      decoded from another particle's posterior mean instead of its own (0 = the latent is ignored);
    * ``spread_A``: 95th percentile over atoms of the RMS fluctuation (Å) of the decoded structures;
    * ``warning``: ``collapse_warning``, or None.
    """
    pool = np.arange(len(ds)) if pool is None else np.asarray(pool)
    idx = np.sort(np.random.default_rng(3).choice(pool, min(len(pool), n), replace=False))
    mus, kls, gains, coords = [], [], [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(idx), batch_size):
            batch = {k: v.to(model.log_scale.device) for k, v in ds.read_batch(idx[i:i + batch_size]).items()}
            mu, logvar = model.encode(batch)
            batch = model.with_poses(batch)
            x = model.decode(mu)
            recs = []
            for xi in (x, torch.roll(x, 1, 0)):  # its own structure, then its neighbour's
                m = model.render(xi, batch["R"], batch["shift_A"], batch["ctf"], batch.get("index"))
                recs.append(model.reconstruction(batch["image"], m, None))
            coords.append(x.cpu().numpy())
            sd = model.prior_var.sqrt()  # in units of the prior's standard deviation, KL(q || N(0, 1)) is the same
            mus.append(mu / sd)
            kls.append(gaussian_kl(mu / sd, logvar - 2 * sd.log(), dims=0))
            gains.append(recs[1] - recs[0])
    model.train(was_training)
    mu = torch.cat(mus)
    out = {"particles": len(idx), "kl_per_dim": torch.cat(kls).mean(0).tolist(),
           "active_units": int(active_units(mu)), "shuffle_nats": float(torch.cat(gains).mean()),
           "spread_A": float(np.percentile(rmsf(np.concatenate(coords)), 95))}
    out["warning"] = collapse_warning(out["spread_A"], out["shuffle_nats"], out["active_units"], mu.shape[1])
    return out


def estimate_noise_sigma(images: Tensor, radius_frac: float = 0.9) -> float:
    """Pixel noise sigma from the corners of (B, 1, D, D) images, outside a disc of ``radius_frac * D / 2``."""
    D = images.shape[-1]
    y, x = torch.meshgrid(torch.arange(D) - D // 2, torch.arange(D) - D // 2, indexing="ij")
    corner = (x**2 + y**2).float().sqrt() > radius_frac * D / 2
    return float(images[..., corner].std())
