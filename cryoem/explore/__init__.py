"""``cryoem explore RUN``: the latent space of a trained atom VAE in the browser.

A local web app: :mod:`cryoem.explore.server` (Python's ``http.server``, no framework) serves the bundled page
(``static/``: ``index.html`` and ``explorer.js``, built from ``js/explorer`` by ``scripts/build_explorer_js.sh``)
and a small HTTP API over :class:`cryoem.explore.session.Session`, which holds the run's model and latents:

* the scatter's axes (PCA, UMAP) and colour columns, as little-endian float32 arrays, never JSON;
* atomic models decoded on demand (and cached) as PDB text, each atom's B-factor column holding its
  displacement from the starting model (Å); maps as MRC;
* paths through the latent space as multi-model PDBs, map series and a ChimeraX ``.cxc``;
* named selections, written as subsets of the ORIGINAL .star / .cs through :mod:`cryoem.subsets` (the code of
  ``cryoem select``) into ``RUN/explore/``, so they survive a reload.

It reads ``RUN/analysis`` (from ``cryoem analyze``) and never loads a particle image.
"""

from cryoem.explore.server import serve
from cryoem.explore.session import Session

__all__ = ["Session", "serve"]
