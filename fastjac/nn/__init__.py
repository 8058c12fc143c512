"""Modules over the functional API: fused tangent layers and the regulariser as a module."""
from .regularizer import JacobianRegularizer
from .tangent import TangentLinear, TangentMLP
