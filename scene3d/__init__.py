"""scene3d: multi-view datasets, encoders, the VAE objective, the shared trainer and the scene autoencoders."""
