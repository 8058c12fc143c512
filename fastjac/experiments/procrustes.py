"""Orthogonal Procrustes and the rotation angle between two sets of 2-D latents (paper App. C).

O = argmin_O ‖Z − O M‖_F over orthogonal O is U Vᵀ with U S Vᵀ = Z Mᵀ. In 2-D, O is a rotation
times a signed permutation of M's axes; signed permutations are rotations by multiples of 90°
(det +1) or those times diag(1, −1) (det −1), so removing them leaves an angle in (−45°, 45°].
"""
from __future__ import annotations

import torch
from torch import Tensor


def procrustes(Z: Tensor, M: Tensor) -> Tensor:
    """The orthogonal O minimising ‖Z − O M‖_F, per batch entry.

    Args:
        Z, M: (..., d, N) the target and the inferred latents, as columns.
    Returns:
        O: (..., d, d) orthogonal.

    Example:
        >>> Z = torch.randn(2, 100)
        >>> torch.allclose(procrustes(Z, Z), torch.eye(2), atol=1e-5)
        True
    """
    if Z.shape != M.shape or Z.dim() < 2:
        raise ValueError(f"Z and M must have the same shape (..., d, N), got {tuple(Z.shape)} and "
                         f"{tuple(M.shape)}")
    U, _, Vh = torch.linalg.svd(Z @ M.mT)
    return U @ Vh


def rotation_angle(O: Tensor) -> Tensor:
    """Rotation angle in degrees, in (−45, 45], of 2×2 orthogonal matrices with the signed
    permutation of the inferred axes removed: O = R(θ + k·90°) [diag(1, −1)].

    Args:
        O: (..., 2, 2) orthogonal.
    Returns:
        (...,) angles in degrees.

    Example:
        >>> R = rotation(torch.deg2rad(torch.tensor(30.0)))
        >>> round(float(rotation_angle(R @ torch.tensor([[0., 1.], [1., 0.]]))), 4)
        30.0
    """
    if O.shape[-2:] != (2, 2):
        raise ValueError(f"O must have shape (..., 2, 2), got {tuple(O.shape)}")
    reflect = torch.linalg.det(O) < 0
    flip = torch.ones(O.shape[:-2] + (1, 2), dtype=O.dtype, device=O.device)
    flip[..., 0, 1] = torch.where(reflect, -1.0, 1.0).to(O.dtype)
    R = O * flip                                                   # O · diag(1, ±1): a rotation
    theta = torch.rad2deg(torch.atan2(R[..., 1, 0], R[..., 0, 0]))
    return 45.0 - torch.remainder(45.0 - theta, 90.0)             # (−45, 45]


def latent_angle(Z: Tensor, M: Tensor) -> Tensor:
    """Angle (degrees, (−45, 45]) between true latents Z and inferred M, both (..., N, 2) rows."""
    return rotation_angle(procrustes(Z.mT, M.mT))


def rotation(angle: Tensor) -> Tensor:
    """2×2 rotation matrices for angles in radians: (...,) -> (..., 2, 2)."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


__all__ = ["procrustes", "rotation_angle", "latent_angle", "rotation"]
