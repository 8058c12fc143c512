"""The decoder zoo: decoders users actually have, each as the module itself and behind a lambda,
against per-sample reverse-mode brute force in float64 — values and gradients (into z and every
decoder parameter) of every estimator that forms Jacobian columns.

The reference runs the *same* estimator code with fastjac's column engine swapped for brute
force (``brute_jacobian(decoder, z) @ directions``), so any difference is the engine's. The
stochastic estimator draws its columns from a generator seeded alike for both runs.

Set FASTJAC_ZOO_REPORT=<file> to append one JSON line per (decoder, form) with the largest
relative errors (the table in the engine's report comes from it).
"""
import functools
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastjac
import fastjac.chunked
import fastjac.autodiff.stacked_ops
import fastjac.jacobian
from fastjac.jacobian import select_output
from decoders import brute_jacobian

DT = torch.float64
RTOL = 1e-8
BETA = 0.5
ESTIMATORS = {
    "exact": {}, "fischer": {"block_size": 2}, "hadamard": {}, "frobenius": {},
    "stochastic": {"num_columns": 2},
}


def seeded(seed=0):
    torch.manual_seed(seed)


# --- the zoo: each builder returns (decoder, z, extra keywords for the estimators) -----------------

def _kl_vae():
    diffusers = pytest.importorskip("diffusers")
    seeded()
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), layers_per_block=1,
        latent_channels=2, norm_num_groups=2, sample_size=4).to(DT).eval()


def diffusers_kl():
    return _kl_vae().decoder, torch.randn(2, 2, 2, 2, dtype=DT), {}


def diffusers_kl_decode():
    """The whole decode (post-quant conv and decoder), returning a ModelOutput: output='sample'."""
    return _kl_vae().decode, torch.randn(2, 2, 2, 2, dtype=DT), {"output": "sample"}


def diffusers_tiny():
    diffusers = pytest.importorskip("diffusers")
    seeded()
    vae = diffusers.AutoencoderTiny(
        in_channels=3, out_channels=3, encoder_block_out_channels=(4, 4), decoder_block_out_channels=(4, 4),
        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=2).to(DT).eval()
    return vae.decoder, torch.randn(2, 2, 2, 2, dtype=DT), {}


def diffusers_vq():
    """VQModel's decoder (quantisation is piecewise constant: its Jacobian is zero, so the
    regulariser acts on the decoder after it, as ``decode(..., force_not_quantize=True)``)."""
    diffusers = pytest.importorskip("diffusers")
    seeded()
    vq = diffusers.VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), layers_per_block=1,
        latent_channels=2, norm_num_groups=2, num_vq_embeddings=8, vq_embed_dim=2, sample_size=4).to(DT).eval()
    return functools.partial(vq.decode, force_not_quantize=True), torch.randn(2, 2, 2, 2, dtype=DT), \
        {"output": "sample"}


class TransformerDecoder(nn.Module):
    """z (B, 6) -> 3 tokens of width 8 -> nn.TransformerEncoder -> (B, 12)."""

    def __init__(self, norm_first):
        super().__init__()
        self.embed = nn.Linear(6, 24)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.body = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8) if norm_first else None,
                                          enable_nested_tensor=False)
        self.head = nn.Linear(8, 4)

    def forward(self, z):
        return self.head(self.body(self.embed(z).reshape(-1, 3, 8))).reshape(z.shape[0], -1)


def transformer(norm_first, frozen=False):
    seeded()
    dec = TransformerDecoder(norm_first).to(DT).eval()
    if frozen:
        dec.requires_grad_(False)
    return dec, torch.randn(2, 6, dtype=DT), {}


def pythae_conv():
    """pythae's Decoder_Conv (MNIST) at toy width: Linear, ConvTranspose + BatchNorm(eval) + ReLU."""
    seeded()
    dec = nn.Sequential(
        nn.Linear(4, 16 * 2 * 2), nn.Unflatten(1, (16, 2, 2)),
        nn.ConvTranspose2d(16, 8, 3, 2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 3, 2, padding=1, output_padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.ConvTranspose2d(4, 1, 3, 2, padding=1, output_padding=1), nn.Sigmoid()).to(DT)
    with torch.no_grad():
        for bn in (dec[3], dec[6]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return dec.eval(), torch.randn(2, 4, dtype=DT), {}


class ResBlock(nn.Module):
    """pythae's ResBlock: x + conv1x1(relu(conv3x3(relu(x))))."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.conv = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(hidden, channels, 1))

    def forward(self, x):
        return x + self.conv(x)


def pythae_resnet():
    seeded()
    dec = nn.Sequential(
        nn.Linear(4, 8 * 2 * 2), nn.Unflatten(1, (8, 2, 2)), nn.ConvTranspose2d(8, 8, 4, 2, padding=1),
        ResBlock(8, 4), ResBlock(8, 4), nn.ReLU(), nn.ConvTranspose2d(8, 4, 4, 2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(4, 1, 4, 2, padding=1), nn.Sigmoid()).to(DT)
    return dec, torch.randn(2, 4, dtype=DT), {}


def functional_norms():
    """A plain function calling F.layer_norm and F.group_norm with its own parameters."""
    seeded()
    W1, W2 = torch.randn(24, 4, dtype=DT, requires_grad=True), torch.randn(10, 24, dtype=DT, requires_grad=True)
    gamma, shift = torch.rand(24, dtype=DT).add(0.5).requires_grad_(), torch.randn(6, dtype=DT, requires_grad=True)

    def decoder(z):
        h = F.layer_norm(torch.tanh(z @ W1.T), (24,), gamma, None)
        h = F.group_norm(F.silu(h).reshape(-1, 6, 4), 3, None, shift).reshape(z.shape[0], -1)
        return h @ W2.T

    decoder.params = [W1, W2, gamma, shift]
    return decoder, torch.randn(2, 4, dtype=DT), {}


class ChannelsLast(nn.Module):
    """GroupNorm on channels-last strides, as after an attention block (permute, no copy)."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(4, 3 * 3 * 4), nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, z):
        h = self.fc(z).reshape(-1, 3, 3, 4).permute(0, 3, 1, 2)  # (B, C, H, W) with C innermost
        return self.conv(F.silu(self.norm(h)))


def channels_last_groupnorm():
    seeded()
    return ChannelsLast().to(DT), torch.randn(2, 4, dtype=DT), {}


def upsample_pixelshuffle():
    seeded()
    dec = nn.Sequential(nn.Linear(4, 4 * 3 * 3), nn.Unflatten(1, (4, 3, 3)), nn.Upsample(scale_factor=2, mode="bilinear"),
                        nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.PixelShuffle(2),
                        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2, 1, 3)).to(DT)
    return dec, torch.randn(2, 4, dtype=DT), {}


def parametrised():
    """weight_norm and spectral_norm parametrisations (spectral norm in eval: no power step per call)."""
    seeded()
    P = nn.utils.parametrizations
    dec = nn.Sequential(P.weight_norm(nn.Linear(4, 16)), nn.ELU(), P.spectral_norm(nn.Linear(16, 16)), nn.Tanh(),
                        P.weight_norm(nn.Linear(16, 12), dim=None)).to(DT)
    return dec.eval(), torch.randn(2, 4, dtype=DT), {}


class Conditional(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4 + 3, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 10))

    def forward(self, z, c):
        return self.net(torch.cat([z, c], -1))


def conditional():
    """A conditional decoder g(z, c) through functools.partial (and the lambda form); brute force
    runs sample i with its own condition c[i]."""
    seeded()
    dec = Conditional().to(DT)
    c = torch.randn(2, 3, dtype=DT)
    return functools.partial(dec, c=c), torch.randn(2, 4, dtype=DT), {
        "per_sample": lambda i: functools.partial(dec, c=c[i:i + 1])}


def spatial():
    """A convolutional decoder of spatial latents z (B, 2, 3, 3) with InstanceNorm and LayerNorm."""
    seeded()
    dec = nn.Sequential(nn.ConvTranspose2d(2, 4, 4, stride=2, padding=1), nn.InstanceNorm2d(4, affine=True),
                        nn.SiLU(), nn.Conv2d(4, 2, 3, padding=1), nn.LayerNorm([2, 6, 6]), nn.Tanh()).to(DT)
    return dec, torch.randn(2, 2, 3, 3, dtype=DT), {}


def mlp():
    """The benchmarks' MLP shape (Linear + ELU runs, sigmoid output): one dense-chain node as a module."""
    seeded()
    dec = nn.Sequential(nn.Linear(4, 16), nn.ELU(), nn.Linear(16, 16), nn.ELU(), nn.Linear(16, 12), nn.Sigmoid())
    return dec.to(DT), torch.randn(3, 4, dtype=DT), {}


ZOO = {
    "MLP (Linear + ELU runs)": mlp,
    "diffusers AutoencoderKL.decoder": diffusers_kl,
    "diffusers AutoencoderKL.decode (output=sample)": diffusers_kl_decode,
    "diffusers AutoencoderTiny.decoder": diffusers_tiny,
    "diffusers VQModel.decode (partial)": diffusers_vq,
    "TransformerEncoder post-norm": functools.partial(transformer, False),
    "TransformerEncoder pre-norm": functools.partial(transformer, True),
    "TransformerEncoder frozen": functools.partial(transformer, True, frozen=True),
    "pythae conv": pythae_conv,
    "pythae resnet": pythae_resnet,
    "functional F.layer_norm/F.group_norm": functional_norms,
    "channels-last GroupNorm": channels_last_groupnorm,
    "Upsample/PixelShuffle": upsample_pixelshuffle,
    "weight/spectral norm": parametrised,
    "conditional (partial)": conditional,
    "spatial latent (B,2,3,3)": spatial,
}
FORMS = {"module": lambda dec: dec, "lambda": lambda dec: (lambda z: dec(z))}


def parameters_of(decoder):
    if hasattr(decoder, "params"):
        return list(decoder.params)
    owner = decoder
    while isinstance(owner, functools.partial):
        owner = owner.func
    owner = getattr(owner, "__self__", owner)
    return [p for p in owner.parameters() if p.requires_grad]


def brute_engine(out, J_full):
    """A stand-in for fastjac.jacobian.columns_along: the brute-force J times the directions."""
    def columns_along(decoder, z, directions, *, chunk_size=None, output=None):
        return out, J_full @ directions.to(J_full.dtype)
    return columns_along


def value_and_gradients(call, z, params):
    value = call()
    grads = torch.autograd.grad(value, [z, *params], allow_unused=True, retain_graph=True)
    return value, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [z, *params])]


def relative_error(ours, ref, floor=1e-300):
    """‖ours − ref‖_∞ / ‖ref‖_∞; ``floor`` bounds the denominator below for quantities that are
    zero in exact arithmetic (e.g. the gradient into an attention key bias: softmax ignores it)."""
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(floor))


def gradient_error(ours, refs):
    """The largest relative error over the gradients; each is measured against at least 1e-6 of
    the largest reference gradient, so a gradient that is zero in exact arithmetic must stay
    below 1e-14 of the others (rounding), not below 1e-8 of its own rounding noise."""
    floor = 1e-6 * max(float(b.abs().max()) for b in refs)
    return max(relative_error(a, b, floor) for a, b in zip(ours, refs))


def regularizers(decoder, z, kw):
    """One call per estimator of the regulariser under test."""
    return {name: (lambda name=name: fastjac.jacobian_regularizer(
        decoder, z, BETA, estimator=name, generator=torch.Generator().manual_seed(3), **ESTIMATORS[name], **kw))
        for name in ESTIMATORS}


def brute_force_columns(decoder, z, kw, per_sample):
    """(out, J (B, D, d)) by per-sample reverse mode, with a graph (sample i through per_sample(i))."""
    def selected(dec):
        return lambda v: select_output(dec(v), kw.get("output"))
    out = selected(decoder)(z)
    rows = [brute_jacobian(selected(per_sample(i)), z[i:i + 1], create_graph=True) for i in range(z.shape[0])]
    return out, torch.cat(rows)


_REFERENCES = {}


def reference(name, monkeypatch):
    """(decoder, z, kw, params, {estimator: (value, gradients)}) with the engine swapped for brute
    force; built once per zoo entry and shared by its forms."""
    if name not in _REFERENCES:
        decoder, z, kw = ZOO[name]()
        per_sample = kw.pop("per_sample", lambda i: decoder)
        z.requires_grad_()
        params = parameters_of(decoder)
        engine = brute_engine(*brute_force_columns(decoder, z, kw, per_sample))
        monkeypatch.setattr(fastjac.jacobian, "columns_along", engine)
        monkeypatch.setattr(fastjac.chunked, "columns_along", engine)
        refs = {est: value_and_gradients(call, z, params) for est, call in regularizers(decoder, z, kw).items()}
        monkeypatch.undo()
        _REFERENCES[name] = (decoder, z, kw, params, refs)
    return _REFERENCES[name]


# The zoo entries that go through torch.func: the stacked evaluation refuses them (batch_first
# attention transposes the batch dimension). Every other entry, in both forms, takes a stacked path
# (fastjac/autodiff/stacked.py for plain Sequentials, fastjac/autodiff/stacked_ops.py for the rest).
FORWARD_AD = {"TransformerEncoder post-norm", "TransformerEncoder pre-norm", "TransformerEncoder frozen"}


def estimator_errors(name, form, monkeypatch):
    """{estimator: (relative error of the value, largest relative error over the gradients)}, after
    checking which path computed the columns."""
    decoder, z, kw, params, refs = reference(name, monkeypatch)
    fastjac.autodiff.stacked_ops.DECISIONS.clear()
    forward_ad, real = [], fastjac.jacobian._forward_ad_push
    monkeypatch.setattr(fastjac.jacobian, "_forward_ad_push", lambda *a: forward_ad.append(1) or real(*a))
    calls = regularizers(FORMS[form](decoder), z, kw)
    ours = {est: value_and_gradients(call, z, params) for est, call in calls.items()}
    monkeypatch.undo()
    path = "torch.func" if forward_ad else "stacked"
    assert (path == "torch.func") == (name in FORWARD_AD), f"{name} ({form}) took the {path} path"
    return {est: (relative_error(ours[est][0], refs[est][0]), gradient_error(ours[est][1], refs[est][1]))
            for est in ESTIMATORS}


def report(name, form, errors):
    path = os.environ.get("FASTJAC_ZOO_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"decoder": name, "form": form, "errors": errors}) + "\n")


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_decoder_values_and_gradients_match_brute_force(name, form, monkeypatch):
    errors = estimator_errors(name, form, monkeypatch)
    report(name, form, errors)
    bad = {est: e for est, e in errors.items() if not max(e) <= RTOL}
    assert not bad, f"{name} ({form}): relative errors (value, gradients) above {RTOL}: {bad}"


def test_frozen_transformer_under_no_grad_gives_exact_columns():
    """Frozen parameters under no_grad take torch's transformer fast path outside fastjac."""
    decoder, z, _ = transformer(True, frozen=True)
    with torch.no_grad():
        out, J = fastjac.jacobian_columns(decoder, z)
        assert not J.requires_grad
    assert relative_error(J, brute_jacobian(decoder, z)) <= RTOL
    assert relative_error(out, decoder(z)) <= RTOL
