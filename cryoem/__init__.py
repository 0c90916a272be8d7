"""cryoem: particle data, atomic models, CTF image formation, the simulator and the atom-coordinate VAE."""
