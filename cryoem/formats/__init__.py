"""One module per particle-file format; each reads and writes its files.

* ``star``: RELION STAR (3.0, 3.1+, 5) -> ``ParticleMeta``; STAR tables from Plato's metadata; row subsets.
* ``cryosparc``: cryoSPARC ``.cs`` (+ its passthrough file, merged by ``uid``) -> ``ParticleMeta``; ``.cs`` writer.
* ``cryodrgn``: an image stack with cryoDRGN pose / CTF ``.pkl`` -> ``ParticleMeta``; the restricted unpickler.
* ``mrc``: MRC / MRCS image stacks and maps.

``cryoem.particles.load_particles`` picks the module by the file's suffix.
"""
