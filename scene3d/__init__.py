"""scene3d: multi-view datasets, encoders, the VAE objective, the shared trainer and the scene autoencoders.

Where things live:

* ``data``        the multi-view dataset type (V images + V Cameras + factors), shards, GQN tfrecord and
                  NeRF-folder readers
* ``generators``  procedural Shepard-Metzler and rooms scenes, ground-truth meshes and occupancy grids
* ``trainer``     the one Trainer of Plato (model interface: ``loss(batch, step) -> dict``, ``"loss"`` = total)
* ``objective``   Gaussian KL, Gaussian log-likelihood, reparameterisation, bits/dim
* ``encoders``    ConvNet image encoder -> Gaussian q(z | x)
* ``metrics``     PSNR, foreground-masked PSNR, SSIM
* ``gqn``, ``gqn_eval``  the Generative Query Network, its evaluation against baselines, and linear probes
* ``viz``         open3d headless rendering; ``runinfo`` run records and user errors; ``cli`` the command line
"""
