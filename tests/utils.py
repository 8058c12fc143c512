"""Shared test helpers: a comparison that reports relative error and NaN positions, and a
tolerance table per dtype.

Tolerances: float64 results are compared to a float64 reference computed a different way
(brute-force Jacobians, slogdet), so only rounding of O(d·D) sums separates them: 1e-10.
float32 accumulates in float32 (relative rounding ~6e-8 per op over D ~ 1e3 terms): 1e-4.
float16/bfloat16 inputs carry 11/8 mantissa bits before fp32 accumulation: 5e-3 / 3e-2.
The error analysis behind these is in docs/maths.md#numerical-error-and-tolerances.
"""
import torch

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close(name, ref, out, rtol=None, atol=0.0):
    """Fail with the max relative error (‖out − ref‖_∞ / max(‖ref‖_∞, tiny)) and NaN positions."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    rtol = RTOL[ref.dtype] if rtol is None else rtol
    bad = ~torch.isfinite(out)
    assert not bad.any(), f"{name}: non-finite values at {bad.nonzero().tolist()[:10]}"
    ref64, out64 = ref.detach().double(), out.detach().double()
    scale = ref64.abs().max().clamp_min(1e-30)
    err = (out64 - ref64).abs().max() / scale
    assert err <= rtol + atol / float(scale), f"{name}: max relative error {float(err):.3e} > {rtol:.1e}"
    return float(err.detach())


def mlp_decoder(d, D, hidden=32, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ELU(),
                               torch.nn.Linear(hidden, D)).to(dtype)


def tiny_train_config(out, **changes):
    """A TrainConfig for a few steps of a tiny digits GRAE≈ run (changes override the defaults)."""
    from fastjac.training import TrainConfig
    base = dict(out=str(out), model="grae", dataset="digits", estimator="stochastic", latent_dim=4,
                width=0.125, steps=6, batch_size=16, checkpoint_every=3, eval_every=100, eval_size=20,
                eval_samples=2, log_every=2, progress=False, device="cpu")
    base.update(changes)
    return TrainConfig(**base)
