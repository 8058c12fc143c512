"""One call from a name to a model: the MLP or App. D architecture with a β-VAE or GRAE on top."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from .. import _validation as check
from .autoencoders import GRAE, BetaVAE
from .networks import DATA_SHAPES, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, _channels
from .posterior import GaussianPosterior

MODELS = ("beta-vae", "grae")
ARCHITECTURES = ("mlp", "mnist", "celeba")


def make_autoencoder(model: str, architecture: str, *, latent_dim: int, beta,
                     data_shape: Optional[Sequence[int]] = None, width: float = 1.0, norm: str = "batch",
                     block_size: int = 1, estimator: str = "exact", num_columns: int = 1,
                     orthogonality_weight: float = 0.0, observation="gaussian"):
    """A :class:`BetaVAE` or :class:`GRAE` on a named architecture.

    Args:
        model: "beta-vae" | "grae".
        architecture: "mlp" (any ``data_shape``; two hidden layers of 256·width units),
            "mnist" (App. D, 1×28×28) or "celeba" (App. D, 3×64×64).
        width: channel / unit multiplier (1.0 = the paper's sizes).
        norm: decoder normalisation for the conv nets, "batch" (App. D) or "none".
        block_size: posterior block size for the β-VAE (1 mean-field, d full); for GRAE the
            block size of "fischer"/"stochastic" and of the orthogonality pairs.
        estimator, num_columns, orthogonality_weight: GRAE only (see :class:`GRAE`).

    Example:
        >>> vae = make_autoencoder("beta-vae", "mnist", latent_dim=12, beta=0.5, block_size=3)
        >>> grae = make_autoencoder("grae", "mlp", data_shape=(1, 8, 8), latent_dim=8, beta=0.5,
        ...                         estimator="stochastic")
    """
    check.choice("model", model, MODELS)
    check.choice("architecture", architecture, ARCHITECTURES)
    check.positive_int("latent_dim", latent_dim)
    if architecture == "mlp":
        if data_shape is None:
            raise ValueError("data_shape is required for architecture='mlp'")
        hidden = (_channels(256, width),) * 2
        encoder, decoder = MLPEncoder(data_shape, hidden=hidden), MLPDecoder(latent_dim, data_shape, hidden=hidden)
    else:
        expected = DATA_SHAPES[architecture]
        if data_shape is not None and tuple(data_shape) != expected:
            raise ValueError(f"architecture={architecture!r} needs data of shape {expected}, "
                             f"got data_shape={tuple(data_shape)}")
        encoder = ConvEncoder(architecture, width=width)
        decoder = ConvDecoder(latent_dim, architecture, width=width, norm=norm)
    if model == "beta-vae":
        head = GaussianPosterior(encoder.out_features, latent_dim, block_size=block_size)
        return BetaVAE(encoder, decoder, posterior=head, beta=beta, observation=observation)
    encoder = nn.Sequential(encoder, nn.Linear(encoder.out_features, latent_dim))
    return GRAE(encoder, decoder, beta=beta, estimator=estimator, num_columns=num_columns,
                block_size=block_size, orthogonality_weight=orthogonality_weight, observation=observation)
