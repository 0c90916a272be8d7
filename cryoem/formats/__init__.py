"""One module per particle-file format; each reads and writes its files.

* ``star``: RELION STAR (3.0, 3.1+, 5) -> ``ParticleMeta``; STAR tables from Plato's metadata; row subsets.
* ``cryosparc``: cryoSPARC ``.cs`` (+ its passthrough file, merged by ``uid``) -> ``ParticleMeta``; ``.cs`` writer.
* ``cryodrgn``: an image stack with cryoDRGN pose / CTF ``.pkl`` -> ``ParticleMeta``; the restricted unpickler.
* ``mrc``: MRC / MRCS image stacks and maps.

``cryoem.particles.load_particles`` picks the module by the file's suffix. Here: :func:`read_file`, the one-line
error for a file that is missing or that its reader cannot read, shared by the four.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from plato_core.runinfo import UserError, one_line

__all__ = ["read_file"]


def read_file(path: str | Path, read, what: str, bad: str):
    """``read(path)`` with warnings silenced; a missing file or a failed read is one ``UserError`` line.

    ``what`` names the file in "<path>: <what> not found"; a failed read says "<path>: <bad> (<the reader's
    error>)". A ``UserError`` raised by ``read`` passes unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read(path)
    except UserError:
        raise
    except Exception as e:  # third-party readers raise many types on a damaged file
        raise UserError(f"{path}: {bad} ({one_line(e)})") from e
