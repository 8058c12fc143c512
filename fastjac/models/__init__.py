"""Thin models over the functional objectives: posteriors, the paper's networks, β-VAE and GRAE.

    >>> from fastjac.models import make_autoencoder
    >>> vae = make_autoencoder("beta-vae", "mnist", latent_dim=12, beta=0.5, block_size=2)
    >>> vae.loss(x).backward(); vae.eval().objectives(x_test, batch_size=500)
"""
from .autoencoders import GRAE, BetaVAE, Objectives
from .linear2d import Linear2DDecoder, LinearGaussianEncoder, random_rotation
from .mixture import GaussianMixture, code_density, sample_images
from .networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from .posterior import GaussianPosterior, Posterior, block_mask
from .presets import ARCHITECTURES, MODELS, make_autoencoder

__all__ = [
    "BetaVAE", "GRAE", "Objectives", "GaussianPosterior", "Posterior", "block_mask",
    "MLPEncoder", "MLPDecoder", "ConvEncoder", "ConvDecoder", "Linear2DDecoder",
    "LinearGaussianEncoder", "random_rotation", "make_autoencoder", "MODELS", "ARCHITECTURES",
    "GaussianMixture", "code_density", "sample_images",
]
