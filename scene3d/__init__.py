"""scene3d: multi-view datasets, encoders, the VAE objective, the shared trainer and the scene autoencoders.

Where things live:

* ``data``        the multi-view dataset type (V images + V Cameras + factors), shards, GQN tfrecord and
                  NeRF-folder readers; ``batch_cameras`` builds the ``Camera`` of an item or a batch
* ``generators``  procedural Shepard-Metzler and rooms scenes, ground-truth meshes and occupancy grids
* ``trainer``     the one Trainer of Plato (model interface: ``loss(batch, step) -> dict``, ``"loss"`` = total)
* ``objective``   Gaussian KL, Gaussian log-likelihood, reparameterisation, bits/dim
* ``encoders``    ConvNet image encoder -> Gaussian q(z | x)
* ``metrics``     PSNR, foreground-masked PSNR, SSIM
* ``gqn``, ``gqn_eval``  the Generative Query Network, its evaluation against baselines, and linear probes
* ``autoencoders``  the voxel, mesh and NeRF scene autoencoders (``SceneAE``), their decoders and the
                  ``SceneDecoder`` protocol they share
* ``ae_eval``     loading, evaluating, calibrating and rendering autoencoder runs
* ``geometry_metrics``  voxel IoU, Chamfer distance, mesh occupancy and the visual-hull baseline
* ``export``      marching cubes on grids and fields; mesh and point-cloud files
* ``viz``         open3d headless rendering; ``runinfo`` run records and user errors
* ``cli``         the ``scene3d`` command line; ``cli_ae`` its autoencoder verbs (train, fit, export, view,
                  render, eval, calibrate)
"""
