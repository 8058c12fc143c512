"""The implicit β-VAE regulariser as an ``nn.Module`` that holds its configuration.

Its options are those of :func:`fastjac.jacobian_regularizer` (the same table,
``fastjac.objectives.REGULARIZER_OPTIONS``, so the two cannot drift apart). β is a buffer: it moves with ``.to()``, can be scheduled in
place (``reg.beta.fill_(0.3)``) and is saved. The other options travel in the state_dict as
extra state, so ``load_state_dict`` restores the configuration. Two things cannot be saved:
a custom observation object and a callable ``output`` selector; they are saved as a marker
and the loading module must have been built with them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import _validation as check
from .. import observations
from ..estimators import check_settings, settings_from
from ..objectives import REGULARIZER_OPTIONS, jacobian_regularizer

# Keyword options of jacobian_regularizer the module holds (the generator is per run, not saved).
OPTIONS = {name: default for name, default in REGULARIZER_OPTIONS.items() if name != "generator"}
STATE_VERSION = 1
_CUSTOM = "__custom__"  # marks an option value that cannot be saved


def _saved(name: str, value):
    """An option value as plain data (weights_only-loadable), or a marker for objects."""
    if name == "observation" and not isinstance(value, str):
        named = {cls: key for key, cls in observations.NAMES.items()}
        if type(value) in named:
            return {"name": named[type(value)], **vars(value)}
        return {_CUSTOM: type(value).__name__}
    if callable(value):
        return {_CUSTOM: type(value).__name__}
    return value


def _restored(name: str, saved, current):
    if isinstance(saved, dict) and _CUSTOM in saved:
        mine = _saved(name, current)
        if isinstance(mine, dict) and _CUSTOM in mine:  # this module was built with its own object
            return current
        raise ValueError(f"the state was saved with a custom {name} ({saved[_CUSTOM]}), which cannot be "
                         f"serialised; build JacobianRegularizer({name}=<that object>) before loading it")
    if name == "observation" and isinstance(saved, dict):
        kwargs = {k: v for k, v in saved.items() if k != "name"}
        return observations.NAMES[saved["name"]](**kwargs)
    return saved


class JacobianRegularizer(nn.Module):
    """(β/2)·R(J_w) [+ λ·orthogonality] of any decoder: :func:`fastjac.jacobian_regularizer`
    with its configuration held in a module.

    Args:
        beta: β > 0 (number or 0-d tensor), stored as the buffer ``beta``.
        generator: torch.Generator for the estimator's random draws (not saved).
        **options: any keyword option of :func:`fastjac.jacobian_regularizer` except ``x``:
            estimator, num_columns, block_size, observation, orthogonality_weight, reduction,
            chunk_size, output, num_probes, cg_max_iter, cg_tol, backend.

    Example:
        >>> reg = JacobianRegularizer(beta=0.5, estimator="stochastic", num_columns=2)
        >>> dec = torch.nn.Linear(4, 64)
        >>> reg(dec, torch.randn(8, 4)).shape
        torch.Size([])
    """

    def __init__(self, beta, *, generator: Optional[torch.Generator] = None, **options):
        super().__init__()
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; JacobianRegularizer takes "
                            f"beta, generator and {', '.join(OPTIONS)}")
        beta = check.beta(beta)
        # float64 holds a Python float exactly; the operators cast β to their accumulation dtype
        self.register_buffer("beta", torch.as_tensor(beta, dtype=torch.float64).detach().clone())
        self.generator = generator
        self._configure({**OPTIONS, **options})

    def _configure(self, options: dict) -> None:
        settings, observation, _ = settings_from(options, OPTIONS, "JacobianRegularizer")
        check_settings(settings)
        observations.get(observation)
        for name in OPTIONS:
            setattr(self, name, options[name])

    @property
    def options(self) -> dict:
        """The current keyword options passed to :func:`fastjac.jacobian_regularizer`."""
        return {name: getattr(self, name) for name in OPTIONS}

    def forward(self, decoder: Callable, z: Tensor, x: Optional[Tensor] = None, *,
                return_output: bool = False):
        """decoder: callable (B, *latent_shape) -> (B, *out); z: (B, d) or (B, *latent_shape);
        x: (B, *out) where w needs it. Returns a scalar, or (B,) for reduction="none"; with
        ``return_output``, (that, decoder output) from the same decoder pass."""
        return jacobian_regularizer(decoder, z, self.beta, x=x, generator=self.generator,
                                    return_output=return_output, **self.options)

    def get_extra_state(self) -> dict:
        return {"version": STATE_VERSION,
                "options": {name: _saved(name, value) for name, value in self.options.items()}}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a JacobianRegularizer state of version {STATE_VERSION}: {state!r}")
        saved = state["options"]
        unknown = sorted(set(saved) - set(OPTIONS))
        if unknown:
            raise ValueError(f"the state holds unknown option(s) {', '.join(unknown)}")
        current = self.options
        self._configure({**current, **{k: _restored(k, v, current[k]) for k, v in saved.items()}})

    def extra_repr(self) -> str:
        shown = {"beta": float(self.beta), "estimator": self.estimator, "observation": self.observation}
        shown.update({k: v for k, v in self.options.items() if k not in shown and v != OPTIONS[k]})
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())
