"""Operators on decoder Jacobians J (B, D, k) (docs/maths.md#operators). Kernels live beside their reference."""
from .column_estimate import column_estimate, hadamard_bound
from .logdet_gram import fischer_bound, logdet_gram, optimal_posterior_covariance
from .orthogonality import orthogonality_penalty
from .tangent_linear import tangent_linear

__all__ = ["logdet_gram", "fischer_bound", "optimal_posterior_covariance", "hadamard_bound",
           "column_estimate", "orthogonality_penalty", "tangent_linear"]
