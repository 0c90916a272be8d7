"""Latent-space analysis of a trained atom VAE: latents, PCA / t-SNE, k-means, traversals, RMSF, index.html."""

from __future__ import annotations

import html
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plato_core.runinfo import UserError, atomic_path, atomic_write


def _pyplot():
    """matplotlib's pyplot on the Agg backend, imported on first use (``cryoem explore`` opens runs without it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class PCA:
    """A fitted principal-component analysis of (N, d) rows: ``components_`` (k, d) unit axes by decreasing variance,
    each signed so that its largest-magnitude entry is positive (scikit-learn's rule), the ``mean_`` (d,), and the
    ``explained_variance_ratio_`` (k,) of the total variance."""

    mean_: np.ndarray
    components_: np.ndarray
    explained_variance_ratio_: np.ndarray

    @property
    def n_components_(self) -> int:
        return len(self.components_)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(M, d) rows -> (M, k) scores."""
        return (np.asarray(x, np.float64) - self.mean_) @ self.components_.T


def pca(latents: np.ndarray, k: int = 2) -> tuple[np.ndarray, PCA]:
    """(N, zdim) -> (N, k) principal-component scores and the fitted PCA (eigenvectors of the covariance, float64:
    one pass over the rows, which matters at 10^6 particles)."""
    z = np.asarray(latents, np.float64)
    mean = z.mean(0)
    cov = np.cov(z - mean, rowvar=False, bias=False).reshape(z.shape[1], z.shape[1])
    var, vec = np.linalg.eigh(cov)
    order = np.argsort(var)[::-1][:min(k, z.shape[1])]
    comps = vec[:, order].T
    comps *= np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])[:, None]
    total = var.sum()
    p = PCA(mean, comps, var[order] / total if total > 0 else np.zeros(len(order)))
    return p.transform(z), p


def kmeans(latents: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means in latent space: (k, zdim) centres and (N,) labels."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(latents)
    return km.cluster_centers_, km.labels_


def traversal(p: PCA, latents: np.ndarray, pc: int, n: int = 10) -> np.ndarray:
    """(n, zdim) latents along principal component ``pc`` (0-based), between its 5th and 95th percentiles."""
    scores = p.transform(latents)[:, pc]
    lo, hi = np.percentile(scores, [5, 95])
    steps = np.linspace(lo, hi, n)
    return p.mean_[None] + steps[:, None] * p.components_[pc][None]


DENSITY_ABOVE = 20_000  # points: scatter_png draws their density instead


def scatter_png(path: Path, xy: np.ndarray, title: str, color: np.ndarray | None = None,
                color_label: str | None = None, centres: np.ndarray | None = None) -> None:
    """Points ``xy`` (N, 2), coloured by ``color`` (N,) if given; above ``DENSITY_ABOVE`` uncoloured points, the
    log density instead (10^5-10^6 points as dots are one saturated blob)."""
    from matplotlib.colors import LogNorm

    fig, ax = _pyplot().subplots(figsize=(5, 4.5), dpi=110)
    if color is None and len(xy) > DENSITY_ABOVE:
        *_, img = ax.hist2d(xy[:, 0], xy[:, 1], bins=200, norm=LogNorm(), cmap="viridis", cmin=1)
        fig.colorbar(img, ax=ax, label="particles per bin")
    else:
        colour = {"c": color, "cmap": "viridis"} if color is not None else {"c": "tab:blue"}
        sc = ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.6, linewidths=0, **colour)
        if color is not None:
            fig.colorbar(sc, ax=ax, label=color_label)
    if centres is not None:
        ax.scatter(centres[:, 0], centres[:, 1], c="red", marker="x", s=40, label="k-means centres")
        for i, (x, y) in enumerate(centres):
            ax.annotate(str(i), (x, y), fontsize=8, color="red")
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(f"{title.split()[0]} 1")
    ax.set_ylabel(f"{title.split()[0]} 2")
    fig.tight_layout()
    _save(fig, path)


def rmsf_png(path: Path, per_residue: np.ndarray, labels: list[str], title: str) -> None:
    fig, ax = _pyplot().subplots(figsize=(8, 3), dpi=110)
    ax.plot(np.arange(len(per_residue)), per_residue, lw=1)
    ticks = np.linspace(0, len(labels) - 1, min(12, len(labels))).astype(int)
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=45, fontsize=7)
    ax.set_ylabel("RMSF (Å)")
    ax.set_xlabel("residue (chain:number)")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    _pyplot().close(fig)


def write_index(folder: Path, items: list[tuple[str, str]], title: str, summary: dict,
                 warning: str | None = None, run: Path | None = None) -> Path:
    """``index.html``, a readable report: ``warning`` on top, a table of ``summary``, the ``cryoem explore``
    command for ``run``, then each (file, caption): images inline, other files as links. The raw ``summary``
    follows as JSON (folded), and is also written as ``summary.json``."""
    rows = []
    for name, caption in items:
        cap = html.escape(caption)
        if name.endswith((".png", ".gif")):
            rows.append(f'<figure><img src="{name}"><figcaption><b>{name}</b>: {cap}</figcaption></figure>')
        else:
            rows.append(f'<li><a href="{name}">{html.escape(name)}</a>: {cap}</li>')
    figures = "".join(r for r in rows if r.startswith("<figure"))
    files = "".join(r for r in rows if r.startswith("<li"))
    banner = (f"<p class='warn'>{html.escape(warning)}</p>" if warning else "")
    explore = ""
    if run is not None:
        cmd = html.escape(f"cryoem explore {Path(run).resolve()}")
        explore = (f"<h2>Explore it in the browser</h2><pre class='cmd'>{cmd}</pre><p>then open "
                   "<a href='http://127.0.0.1:8050/'>http://127.0.0.1:8050/</a>: click a point for its atomic "
                   "model, lasso particles and save them as a subset of the original .star / .cs. On a remote "
                   "machine, forward the port first: <code>ssh -L 8050:127.0.0.1:8050 user@host</code>.</p>")
    raw = html.escape(json.dumps(summary, indent=2))
    body = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}</head>"
            f"<body><h1>{html.escape(title)}</h1>{banner}{summary_table(summary)}{explore}"
            f"<h2>Figures</h2><div class='figs'>{figures}</div><h2>Files</h2><ul>{files}</ul>"
            f"<details><summary>every number above, as JSON (summary.json)</summary><pre>{raw}</pre></details>"
            "</body></html>")
    atomic_write(folder / "summary.json", json.dumps(summary, indent=2))
    path = folder / "index.html"
    atomic_write(path, body)
    return path


_STYLE = ("<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}"
          "table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;"
          "vertical-align:top}th{color:#555;font-weight:normal}.warn{background:#fdd;border:2px solid #c00;"
          "padding:8px}.cmd{background:#f4f4f4;padding:8px;font-size:14px}.figs{display:flex;flex-wrap:wrap;"
          "gap:16px}figure{margin:0;max-width:520px}figure img{max-width:520px}figcaption{font-size:13px}</style>")


def summary_table(summary: dict) -> str:
    """The analysis summary as an HTML table of plain-language rows (numbers rounded for reading)."""
    d = summary.get("latent_diagnostics", {})
    rows = [("particles", f"{summary['particles']:,}"), ("atoms modelled", f"{summary['atoms']:,}"),
            ("latent dimensions", f"{summary['zdim']} ({d.get('active_units', '?')} active)")]
    if "spread_A" in d:
        state = "collapsed: the decoded structures barely differ" if d.get("warning") else "in use"
        rows.append(("latent", f"{state}; decoded atoms spread {d['spread_A']:.2f} Å (95th-percentile RMSF; "
                               "under 0.25 Å is collapse)"))
        rows.append(("shuffled latents cost", f"{d['shuffle_nats']:.1f} nats per particle"))
    ev = summary.get("pca_explained_variance", [])
    rows.append(("latent PCA, explained variance", ", ".join(f"PC{i + 1} {v:.0%}" for i, v in enumerate(ev))))
    sizes = summary.get("cluster_sizes")
    rows.append(("k-means clusters", f"{summary['k']}" + (f" (particles: {', '.join(map(str, sizes))})"
                                                             if sizes else "")))
    rows.append(("largest per-residue RMSF", f"{summary['max_residue_rmsf_A']:.2f} Å"))
    if "max_residue_halfset_disagreement_A" in summary:
        rows.append(("largest half-set disagreement", f"{summary['max_residue_halfset_disagreement_A']:.2f} Å"))
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


# ----------------------------------------------------------------------------- the workflow
REFINE_MAX = 20_000  # above this many particles, analyze keeps the posterior means stored by training


def posterior_means(model, ds, refine: bool | None = None, progress: bool = True) -> tuple[np.ndarray, str]:
    """Each particle's posterior mean (N, zdim), in input order, and a phrase that says where they came from.

    Training stores every particle's posterior mean at its last visit (``AtomVAE.z_last``, kept in the latent's
    current coordinates by every re-expression), as cryoDRGN writes its ``z.N.pkl``. With ``refine`` every particle
    is encoded again from there (:func:`encode_all`: one Gauss-Newton step, then the posterior mean by importance
    sampling, ``AtomVAE.importance_mean``); without it only the particles whose stored mean is missing or stale
    (``AtomVAE.fresh``: training never reached them, or not for many re-expressions) are encoded, as training stores
    them (the Laplace approximation's mean, no sampling). ``refine=None``: refine up to ``REFINE_MAX`` particles.

    Why: encoding a particle costs zdim + 1 renderings for the Gauss-Newton step and ``POSTERIOR_SAMPLES`` (32) for
    the importance sampling: 8,000 particles of a 6,028-atom model took 4.6 minutes on one core (35 ms each), so
    10^6 would take hours. Measured on 10-minute runs (8,000 particles, every one seen; |rho|, R², RMSD ratio), the
    stored means gave 0.986 / 0.971 / 0.217 on the morph and 0.829 / 0.763 / 0.466 on the hinge (an older model),
    one Gauss-Newton step 0.987 / 0.972 / 0.216 and 0.832 / 0.773 / 0.449. With the importance-sampled means, on
    today's defaults: hinge2 |rho| 0.965 -> 0.973, R² 0.930 / 0.644 -> 0.944 / 0.703, RMSD ratio 0.128 -> 0.112;
    hinge1 0.924 / 0.949 / 0.094 -> 0.940 / 0.957 / 0.077; the morph at SNR 0.01 (30 minutes) 0.821 / 0.663 /
    0.215 -> 0.848 / 0.708 / 0.210; the morph and the NMR ensemble the same or a little better.
    """
    n = len(ds)
    seen = getattr(model, "z_seen", None)
    if seen is None or len(seen) != n:  # another particle set than the run's: encode them all
        return encode_all(model, ds, progress=progress, sample=n <= REFINE_MAX), "encoded here"
    refine = n <= REFINE_MAX if refine is None else refine
    from cryoem.vae import MAX_STALE_WHITENS

    fresh = model.fresh() if hasattr(model, "fresh") else seen
    todo = np.arange(n) if refine else np.flatnonzero(~fresh.cpu().numpy())
    z = model.z_last.detach().cpu().numpy().astype(np.float32, copy=True)
    if len(todo):
        from cryoem.particles import ParticleSubset

        z[todo] = encode_all(model, ParticleSubset(ds, todo), progress=progress, sample=refine)  # as stored, unless all
    if refine:
        return z, "encoded again from the means stored by training (posterior means by importance sampling)"
    return z, (f"as stored by training ({len(todo)} particles that training never reached, or not for "
               f"{MAX_STALE_WHITENS}+ re-expressions of the latent, were encoded here)")


def encode_all(model, ds, batch_size: int = 128, progress: bool = True, sample: bool = True) -> np.ndarray:
    """Posterior means (N, zdim) of every particle, in the input particle order: with ``sample``, by importance
    sampling from the Laplace approximation (``AtomVAE.posterior_mean``); without, the Laplace approximation's
    mean (``AtomVAE.encode``), as training stores them, at a quarter of the cost."""
    import torch
    from tqdm import tqdm

    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(ds), batch_size), desc="encode", disable=not progress, unit="batch"):
            idx = np.arange(i, min(i + batch_size, len(ds)))
            batch = {k: v.to(model.log_scale.device) for k, v in ds.read_batch(idx).items()}
            mu = model.posterior_mean(batch) if sample and hasattr(model, "posterior_mean") else model.encode(batch)[0]
            out.append(mu.cpu().numpy())
    return np.concatenate(out)


def diagnostics_png(path: Path, d: dict) -> None:
    """Bar chart of the KL per latent dimension, titled with the active units and the shuffled-z cost."""
    kl = np.asarray(d["kl_per_dim"])
    fig, ax = _pyplot().subplots(figsize=(5, 3), dpi=110)
    ax.bar(np.arange(1, len(kl) + 1), kl, color="tab:red" if d["warning"] else "tab:blue")
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats per particle)")
    ax.set_xticks(np.arange(1, len(kl) + 1))
    state = "COLLAPSED" if d["warning"] else "in use"
    ax.set_title(f"latent {state}: decoded atoms spread {d['spread_A']:.2f} Å (95th pct RMSF),\n"
                 f"{d['active_units']}/{len(kl)} active units, shuffled z costs "
                 f"{round(d['shuffle_nats'], 1) + 0.0:.1f} nats", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def decode(model, z: np.ndarray, offset, batch_size: int = 256) -> np.ndarray:
    """(M, zdim) latents -> (M, N, 3) coordinates in the starting model's frame (Å)."""
    import torch

    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] != model.cfg.zdim:
        raise UserError(f"--z: expected an (M, {model.cfg.zdim}) array of latents, got shape {z.shape}")
    if not np.isfinite(z).all():  # a NaN latent decodes to NaN coordinates: a model full of "nan"
        raise UserError(f"--z: {int((~np.isfinite(z).all(1)).sum())} latents hold NaN or infinite values")
    with torch.no_grad():
        xs = [model.decode(torch.as_tensor(z[i:i + batch_size], device=model.log_scale.device)).cpu().numpy()
              for i in range(0, len(z), batch_size)]
    return np.concatenate(xs) + np.asarray(offset)[None, None]


def write_maps(model, coords: np.ndarray, offset, folder: Path, stem: str) -> list[str]:
    """Density maps (box³ at the particle pixel size) of each model in ``coords`` (M, N, 3) -> ``stem_XX.mrc``."""
    import torch

    from cryoem.formats.mrc import write_mrc
    from renderers.gaussian import gaussian_density_map

    names = []
    centred = torch.as_tensor(coords - np.asarray(offset)[None, None], dtype=torch.float32)
    for i, c in enumerate(centred):
        vol = gaussian_density_map(c, model.amplitudes, model.sigmas, model.box, model.apix)
        origin = np.asarray(offset) - (model.box // 2) * model.apix
        name = f"{stem}_{i:02d}.mrc"
        write_mrc(folder / name, vol.numpy(), model.apix, origin=tuple(origin))
        names.append(name)
    return names


def per_residue(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    return np.bincount(groups, weights=values) / np.bincount(groups)


def load_color(spec: str | None, n: int) -> tuple[np.ndarray | None, str | None]:
    """``file.npz:key`` -> a (N,) colour array of finite numbers, one per particle; else one UserError line."""
    import zipfile
    import zlib

    if spec is None:
        return None, None
    path, _, key = spec.rpartition(":")
    if not path or not key:
        raise UserError(f"--color {spec}: expected FILE.npz:KEY")
    if not Path(path).is_file():
        raise UserError(f"--color {path}: file not found")
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"--color {path}: not a numpy .npz file ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise UserError(f"--color {path}: a single array; expected an .npz archive of named arrays (FILE.npz:KEY)")
    with f:
        if key not in f:
            raise UserError(f"--color {path}: no array {key!r} (has {', '.join(f.files) or 'none'})")
        try:
            c = np.asarray(f[key])
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise UserError(f"--color {path}:{key}: unreadable ({' '.join(str(e).split())[:120]})") from None
    if c.dtype.kind not in "biuf":
        raise UserError(f"--color {path}:{key}: holds {c.dtype} values; expected numbers")
    if c.shape != (n,):
        raise UserError(f"--color {path}:{key}: expected one value per particle ({n},), got {c.shape}")
    bad = np.flatnonzero(~np.isfinite(c))
    if len(bad):
        raise UserError(f"--color {path}:{key}: {len(bad)} values are NaN or infinite (first: particle {bad[0]})")
    return c.astype(float), key


def run_analysis(run: str | Path, k: int = 10, color: str | None = None, device: str = "cpu",
                 snapshots: bool = True, particles: str | None = None, datadir: str | None = None,
                 refine: bool | None = None) -> Path:
    """Write ``RUN/analysis/`` (latents, PCA/t-SNE, k-means models and maps, traversals, RMSF, index.html).

    ``particles`` / ``datadir`` say where the run's data are now, when they have moved (see ``load_run``).
    Every input (``k``, ``color``, the run) is checked before anything is written. ``refine``: see
    :func:`posterior_means`.
    """
    from sklearn.manifold import TSNE

    from cryoem.structure import residue_groups, rmsf
    from cryoem.train import load_run
    from cryoem.vae import latent_diagnostics

    if k < 1:
        raise UserError(f"--k {k}: expected at least 1 k-means cluster")
    run = Path(run)
    primary = run / "half1" if (run / "half1" / "model.json").is_file() else run
    model, rec, ds, s = load_run(primary, device, particles=particles, datadir=datadir)
    cvals, clabel = load_color(color, len(ds))
    out = run / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    offset = np.asarray(rec["offset"])
    items: list[tuple[str, str]] = []

    diag = latent_diagnostics(model, ds)
    if diag["warning"]:
        print(diag["warning"], file=sys.stderr)
    diagnostics_png(out / "latent_diagnostics.png", diag)
    items.append(("latent_diagnostics.png", f"is the latent used? KL per dimension on {diag['particles']} particles; "
                                            "'spread' is the 95th-percentile RMS fluctuation of an atom across "
                                            "the decoded structures (under 0.25 Å = collapsed); 'shuffled z' is "
                                            "how much worse particles are reconstructed from other particles' "
                                            "latents (nats per particle)"))
    z, how = posterior_means(model, ds, refine)
    np.save(out / "latents.npy", z)
    items.append(("latents.npy", f"posterior means, {z.shape[0]} particles x zdim {z.shape[1]}, input order; {how}"))
    scores, p = pca(z, 2)
    if scores.shape[1] < 2:
        scores = np.concatenate([scores, np.zeros_like(scores)], 1)
    centres, labels = kmeans(z, min(k, len(z)))
    np.save(out / "kmeans_labels.npy", labels.astype(np.int64))
    items.append(("kmeans_labels.npy", f"k-means cluster (0-{len(centres) - 1}) of each particle, input order "
                                       "(cryoem select --clusters)"))
    scatter_png(out / "pca.png", scores, "PC of the latents", cvals, clabel, p.transform(centres)
                if p.n_components_ > 1 else None)
    ev = ", ".join(f"{v:.0%}" for v in p.explained_variance_ratio_)
    items.append(("pca.png", f"latent PCA (explained variance {ev}), coloured by {clabel or 'nothing'}; "
                             "red crosses: k-means centres"))
    sub = np.random.default_rng(0).choice(len(z), min(len(z), 3000), replace=False)
    if np.ptp(z[sub], axis=0).max() > 0:  # scikit-learn's t-SNE crashes the process on identical points
        emb = TSNE(2, init="pca", random_state=0, perplexity=min(30, len(sub) - 1)).fit_transform(z[sub])
        scatter_png(out / "tsne.png", emb, "t-SNE of the latents", None if cvals is None else cvals[sub], clabel)
        items.append(("tsne.png", f"t-SNE of {len(sub)} particles' latents"))

    items += decoded_models(model, s, z, p, centres, labels, offset, out)

    groups, res_labels = residue_groups(s)
    sample = np.random.default_rng(1).choice(len(z), min(len(z), 2000), replace=False)
    models = decode(model, z[sample], offset)
    atom_rmsf = rmsf(models)
    res_rmsf = per_residue(atom_rmsf, groups)
    rmsf_png(out / "rmsf.png", res_rmsf, res_labels, f"per-residue RMSF of {len(sample)} decoded particles")
    items.append(("rmsf.png", "per-residue RMSF (Å) across decoded particles: where the model moves"))
    summary = {"particles": len(z), "zdim": z.shape[1], "atoms": s.n_atoms, "k": len(centres),
               "cluster_sizes": np.bincount(labels, minlength=len(centres)).tolist(),
               "max_residue_rmsf_A": float(res_rmsf.max()),
               "pca_explained_variance": p.explained_variance_ratio_.tolist(), "latent_diagnostics": diag}

    if primary != run:
        dis = halfset_disagreement(run, ds, groups, particles=particles, datadir=datadir)
        rmsf_png(out / "halfset_disagreement.png", dis, res_labels,
                 "per-residue disagreement between half-set models (Å)")
        np.save(out / "halfset_disagreement.npy", dis)
        items.append(("halfset_disagreement.png", "per-residue RMS difference between the two half-set models' "
                                                  "decodings of the same particles: high = unsupported by the data"))
        summary["max_residue_halfset_disagreement_A"] = float(dis.max())

    if snapshots:  # in a fresh process, so that a stuck open3d (lavapipe) cannot hold up the analysis
        for pdb, png, color, caption in (
                ("kmeans.pdb", "kmeans.png", "rmsf", "k-means models, coloured by RMSF across them (yellow: most)"),
                ("pc1.pdb", "pc1.gif", "displacement", "the motion along latent PC1, coloured by displacement")):
            if _view(out / pdb, out / png, color):
                items.append((png, caption))
    write_index(out, items, f"Plato atom VAE analysis: {run}", summary, warning=diag["warning"], run=run)
    return out / "index.html"


def decoded_models(model, s, z: np.ndarray, p: PCA, centres: np.ndarray, labels: np.ndarray, offset,
                   out: Path) -> list[tuple[str, str]]:
    """Models (.pdb) and maps (.mrc) at the k-means ``centres`` (k, zdim) and along latent PC1 and PC2 of
    the latents ``z`` (N, zdim); returns the (file, caption) items of index.html."""
    from cryoem.structure import write_pdb

    items = []
    km_models = decode(model, centres, offset)
    _check_in_range(km_models, "the k-means centres")
    write_pdb(out / "kmeans.pdb", s.with_coords(km_models))
    write_maps(model, km_models, offset, out, "kmeans")
    counts = np.bincount(labels, minlength=len(centres))
    items.append(("kmeans.pdb", f"{len(centres)} models decoded at the k-means centres (particles per "
                                f"cluster: {counts.tolist()}); maps kmeans_XX.mrc"))
    for pc in range(min(2, z.shape[1])):
        trav = decode(model, traversal(p if p.n_components_ > pc else pca(z, 2)[1], z, pc), offset)
        _check_in_range(trav, f"latent PC{pc + 1}")
        write_pdb(out / f"pc{pc + 1}.pdb", s.with_coords(trav))
        write_maps(model, trav, offset, out, f"pc{pc + 1}")
        items.append((f"pc{pc + 1}.pdb", f"10 models along latent PC{pc + 1} (5th to 95th percentile); "
                                         f"maps pc{pc + 1}_XX.mrc"))
    return items


def _check_in_range(coords: np.ndarray, where: str) -> None:
    """A UserError (one line) when decoded models (M, N, 3) Å hold atoms beyond what a PDB file can hold: latents
    that far outside the prior mean that the run's stored means are unusable, and ``--refine`` encodes every
    particle again."""
    far = float(np.abs(coords).max(initial=0))
    if not np.isfinite(far) or far >= 1e4:
        raise UserError(f"analyze: the models decoded at {where} have atoms {far:.3g} Å from the origin: the "
                        "latents are far outside the prior; run `cryoem analyze RUN --refine` to encode every "
                        "particle again")


def _view(pdb: Path, out: Path, color: str, timeout: float = 120) -> bool:
    """``cryoem view`` in a subprocess; False (with a warning) if open3d does not finish within ``timeout`` s."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "cryoem.cli", "view", str(pdb), "--color", color, "--size", "240", "--out", str(out)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"warning: {out.name}: open3d did not finish in {timeout:.0f} s (busy CPU?); skipped", file=sys.stderr)
        return False
    if r.returncode:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit code {r.returncode}"
        raise UserError(f"{out}: snapshot failed: {last}")
    return True


def halfset_disagreement(run: Path, ds, groups: np.ndarray, n: int = 1000, particles: str | None = None,
                         datadir: str | None = None) -> np.ndarray:
    """Per-residue RMS distance (Å) between the two half-set models' decodings of the same particles."""
    from cryoem.particles import ParticleSubset
    from cryoem.train import load_run

    idx = np.random.default_rng(2).choice(len(ds), min(len(ds), n), replace=False)
    decs = []
    for h in ("half1", "half2"):
        model, rec, _, _ = load_run(run / h, particles=particles, datadir=datadir)
        decs.append(decode(model, encode_all(model, ParticleSubset(ds, idx), progress=False), rec["offset"]))
    d2 = ((decs[0] - decs[1]) ** 2).sum(-1).mean(0)
    return np.sqrt(per_residue(d2, groups))


