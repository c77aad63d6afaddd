"""Latent-digits example: class-conditional latent diffusion on scikit-learn's bundled 8×8 handwritten digits."""
