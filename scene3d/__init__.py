"""scene3d: learning 3D scenes from multi-view images: datasets, the GQN and the voxel, mesh and NeRF autoencoders.

The training machinery (trainer, settings, run folders, objective, encoders) is :mod:`plato_core`'s.

Where things live:

* ``data``        the multi-view dataset type (V images + V Cameras + factors), shards, GQN tfrecord and
                  NeRF-folder readers; ``batch_cameras`` builds the ``Camera`` of an item or a batch
* ``generators``  procedural Shepard-Metzler and rooms scenes, ground-truth meshes and occupancy grids
* ``metrics``     PSNR, foreground-masked PSNR, SSIM; ``format_table`` for every results table
* ``gqn``, ``gqn_eval``  the Generative Query Network, its evaluation against baselines, and linear probes
* ``autoencoders``  the voxel, mesh and NeRF scene autoencoders (``SceneAE``, ``SceneAE.from_run``), their
                  decoders and the ``SceneDecoder`` protocol they share
* ``ae_eval``     evaluating, calibrating, scoring and rendering autoencoder runs
* ``geometry_metrics``  voxel IoU, Chamfer distance, mesh occupancy and the visual-hull baseline
* ``export``      marching cubes on grids and fields; mesh and point-cloud files
* ``viz``         open3d headless rendering (also cryoem's pictures)
* ``cli``         the ``scene3d`` command line (data, train gqn, eval of every kind, probe); ``cli_ae`` the
                  autoencoder verbs (train voxel|mesh|nerf, fit, export, view, render, calibrate)
"""
