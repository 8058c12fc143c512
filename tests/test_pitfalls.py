"""The pitfalls users hit with decoder Jacobians, each handled and checked against brute force
(per-sample torch.autograd.functional.jacobian): BatchNorm on batch statistics, torch.no_grad,
dropout, tuple/dict outputs, and second-order terms (gradients *of* J) for many layer types."""
import collections
import functools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from fastjac import grae_loss, jacobian_columns
from fastjac.jacobian import BatchCouplingWarning
from utils import assert_close

B, d, D = 3, 4, 6


def brute_jacobian(decoder, z, create_graph=False):
    """(B, D, d): one reverse-mode Jacobian per sample, the slow obvious way."""
    return torch.stack([torch.autograd.functional.jacobian(lambda v: decoder(v[None]).reshape(-1), zi,
                                                           create_graph=create_graph) for zi in z])


def codes(seed=0):
    torch.manual_seed(seed)
    return torch.randn(B, d, dtype=torch.float64, requires_grad=True)


def bn_decoder(**bn):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8, **bn), nn.ELU(), nn.Linear(8, D)).double()


# --- BatchNorm -----------------------------------------------------------------------------------

def test_batchnorm_in_training_mode_is_refused_with_the_reason_and_the_fix():
    dec = bn_decoder().train()
    z = codes()
    for call in (lambda: jacobian_columns(dec, z),
                 lambda: jacobian_columns(dec.forward, z),                      # bound method
                 lambda: jacobian_columns(functools.partial(dec), z),            # partial
                 lambda: grae_loss(dec, z, torch.zeros(B, D, dtype=torch.float64), 0.5, chunk_size=2)):
        with pytest.raises(ValueError, match=r"couple the samples.*eval\(\).*GroupNorm"):
            call()
    assert int(dec[1].num_batches_tracked) == 0  # refused before touching the running statistics


def test_batchnorm_on_batch_statistics_warns_and_really_couples_samples():
    dec = bn_decoder(track_running_stats=False)  # batch statistics even in eval mode
    z = codes()
    with pytest.warns(BatchCouplingWarning, match="GroupNorm"):
        _, J = jacobian_columns(dec, z)
    # what the warning says: J moves every sample at once, so it is not the per-sample Jacobian ...
    full = torch.autograd.functional.jacobian(lambda v: dec(v), z)           # (B, D, B, d)
    assert_close("J = Σ_b' ∂g_b/∂z_b'", full.sum(2), J, atol=1e-12)
    per_sample = torch.stack([full[b, :, b] for b in range(B)])
    assert (J - per_sample).abs().max() > 1e-3
    # here it is even zero: BatchNorm right after the first layer cancels a shift shared by the batch
    assert J.abs().max() < 1e-12


def test_batchnorm_in_eval_mode_and_groupnorm_are_per_sample_and_silent(recwarn):
    dec = bn_decoder()
    with torch.no_grad():
        dec[1].running_mean.uniform_(-1, 1)
        dec[1].running_var.uniform_(0.5, 2)
    dec.eval()
    torch.manual_seed(1)
    group = nn.Sequential(nn.Linear(d, 8), nn.GroupNorm(2, 8), nn.ELU(), nn.Linear(8, D)).double()
    z = codes()
    for decoder in (dec, group):
        _, J = jacobian_columns(decoder, z)
        assert_close("J", brute_jacobian(decoder, z), J)
    assert not [w for w in recwarn if issubclass(w.category, BatchCouplingWarning)]


# --- torch.no_grad -------------------------------------------------------------------------------

def test_no_grad_does_not_stop_forward_tangents():
    torch.manual_seed(0)
    first, last = nn.Linear(d, 8).double(), nn.Linear(8, D).double()
    plain = lambda v: last(torch.tanh(first(v)))                               # noqa: E731

    def inner_no_grad(v):
        with torch.no_grad():
            h = torch.tanh(first(v))
        return last(h)

    z = codes()
    brute = brute_jacobian(plain, z, create_graph=True)
    with torch.no_grad():  # outside: the columns are exact, only no graph is kept
        _, J = jacobian_columns(plain, z)
    assert not J.requires_grad
    assert_close("J under no_grad", brute, J)
    _, J_inner = jacobian_columns(inner_no_grad, z)  # inside: the tangent still flows through the block
    assert_close("J with an inner no_grad block", brute, J_inner)
    # ... but no graph was recorded there: the regulariser's gradient into z misses that block
    g_brute = torch.autograd.grad((brute ** 2).sum(), z)[0]
    g_inner = torch.autograd.grad((J_inner ** 2).sum(), z, allow_unused=True)[0]
    assert g_inner is None or (g_inner - g_brute).abs().max() > 1e-3
    # the fixes the docs give: requires_grad_(False) freezes parameters and keeps every other gradient
    first.requires_grad_(False)
    _, J_frozen = jacobian_columns(plain, z)
    assert_close("grad z, frozen first layer", g_brute, torch.autograd.grad((J_frozen ** 2).sum(), z)[0])
    _, J_cut = jacobian_columns(lambda v: last(torch.tanh(first(v)).detach()), z)  # detach stops the tangent
    assert J_cut.abs().max() == 0


# --- dropout -------------------------------------------------------------------------------------

def test_dropout_one_mask_for_primal_tangents_and_chunks():
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(d, 16), nn.ELU(), nn.Dropout(0.5), nn.Linear(16, D)).double().train()
    z = codes()

    def seeded(v):  # the brute force redraws the same mask at every call
        torch.manual_seed(7)
        return dec(v)

    full = torch.autograd.functional.jacobian(seeded, z)      # (B, D, B, d), one call, one mask
    brute = torch.stack([full[b, :, b] for b in range(B)])
    for chunk_size in (None, 1, 3):
        torch.manual_seed(7)
        out, J = jacobian_columns(dec, z, chunk_size=chunk_size)
        assert_close(f"out chunk {chunk_size}", seeded(z), out)
        assert_close(f"J chunk {chunk_size}", brute, J)
    torch.manual_seed(8)
    assert (jacobian_columns(dec, z)[1] - brute).abs().max() > 1e-3  # the mask matters


# --- tuple / dict outputs ------------------------------------------------------------------------

Output = collections.namedtuple("Output", "mean logvar")


class MultiHead(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.kind = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 2 * D)).double(), kind

    def forward(self, z):
        mean, logvar = self.body(z).chunk(2, -1)
        return {"tuple": (mean, logvar), "dict": {"mean": mean, "logvar": logvar},
                "namedtuple": Output(mean, logvar)}[self.kind]


@pytest.mark.parametrize("kind, selector", [("tuple", 0), ("dict", "mean"), ("namedtuple", "mean"),
                                            ("dict", lambda r: r["mean"])])
def test_tuple_and_dict_outputs_with_output_selector(kind, selector):
    dec = MultiHead(kind)
    z = codes()
    mean_only = lambda v: dec.body(v).chunk(2, -1)[0]                          # noqa: E731
    out, J = jacobian_columns(dec, z, output=selector)
    assert_close("out", mean_only(z), out)
    assert_close("J", brute_jacobian(mean_only, z), J)
    x = torch.randn(B, D, dtype=torch.float64)
    ref = grae_loss(mean_only, z, x, 0.5, estimator="exact")
    for chunk_size in (None, 3):
        assert_close("grae", ref, grae_loss(dec, z, x, 0.5, estimator="exact", output=selector,
                                            chunk_size=chunk_size))


def test_tuple_output_without_selector_says_what_to_do():
    z = codes()
    with pytest.raises(TypeError, match="output="):
        jacobian_columns(MultiHead("tuple"), z)
    with pytest.raises((ValueError, TypeError), match="output"):
        jacobian_columns(MultiHead("dict"), z, output="missing")


# --- second-order terms: gradients of J, three ways -----------------------------------------------

class InstanceNormFlat(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.InstanceNorm1d(2, affine=True)

    def forward(self, x):
        return self.norm(x.reshape(x.shape[0], 2, -1)).reshape(x.shape)


LAYERS = {
    "elu": nn.ELU, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "silu": nn.SiLU,
    "gelu": nn.GELU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "celu": lambda: nn.CELU(0.7),
    "group_norm": lambda: nn.GroupNorm(2, 8), "rms_norm": lambda: nn.RMSNorm(8),
    "softmax": lambda: nn.Softmax(-1), "log_softmax": lambda: nn.LogSoftmax(-1),
    "layer_norm": lambda: nn.LayerNorm(8), "instance_norm": InstanceNormFlat,
}
# Layers whose forward-AD formula is not exactly differentiable in reverse mode in torch 2.13:
# plain forward AD gives wrong gradients of J (the norms) or fails in backward ((log_)softmax:
# "modified by an inplace operation"); torch.func's formulas for (log_)softmax are exact.
FORWARD_AD_GAPS = ("layer_norm", "instance_norm", "softmax", "log_softmax")


def mlp_with(layer):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(d, 8), LAYERS[layer](), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, D)).double()


def conv_decoder():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(d, 2 * 3 * 3), nn.Unflatten(1, (2, 3, 3)), nn.ELU(),
                         nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1), nn.Softplus(),
                         nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(2, 1, 3),
                         nn.Sigmoid()).double()


def forward_ad_jacobian(decoder, z):
    """Columns by torch.autograd.forward_ad dual tensors, one column at a time."""
    cols = []
    with fwAD.dual_level():
        for j in range(z.shape[1]):
            out = decoder(fwAD.make_dual(z, torch.eye(z.shape[1], dtype=z.dtype)[j].expand_as(z)))
            cols.append(fwAD.unpack_dual(out).tangent.reshape(z.shape[0], -1))
    return torch.stack(cols, -1)


def gradients_of(J, dec, z, probe):
    """∂/∂(z, θ) of a function of J: needs the decoder's second derivatives."""
    return torch.autograd.grad((J * probe).sum() + (J ** 2).sum(), [z, *dec.parameters()], allow_unused=True)


def assert_same_gradients(name, ref, ours):
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a is None or b is None:  # e.g. the output bias does not move J
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0), f"{name} grad {i}"
        else:
            assert_close(f"{name} grad {i}", b, a)


@pytest.mark.parametrize("layer", [*LAYERS, "conv"])
def test_gradients_of_columns_match_brute_force(layer):
    """jacobian_columns (torch.func, with the decomposed norms) and, where torch's formulas are
    exact, plain forward AD, against reverse-over-reverse per-sample Jacobians."""
    dec = conv_decoder() if layer == "conv" else mlp_with(layer)
    z = codes(1)
    brute = brute_jacobian(dec, z, create_graph=True)
    probe = torch.randn_like(brute)
    reference = gradients_of(brute, dec, z, probe)
    J = jacobian_columns(dec, z)[1]
    assert_close(f"{layer} J", brute, J)
    assert_same_gradients(f"{layer} jacobian_columns", reference, gradients_of(J, dec, z, probe))
    if layer not in FORWARD_AD_GAPS:
        assert_same_gradients(f"{layer} forward_ad", reference, gradients_of(forward_ad_jacobian(dec, z), dec, z, probe))


@pytest.mark.parametrize("layer", ["layer_norm", "instance_norm"])
def test_norm_layers_need_the_decomposition(layer):
    """Why jacobian_columns applies op rules to these layers: torch's own forward-AD formulas give
    values right but gradients of J wrong. If the plain forward-AD check fails, torch has fixed
    them and the layer_norm / instance_norm rules in fastjac/_rules.py can go. The same decoder
    hidden in a lambda is exact through jacobian_columns (the rules see every call)."""
    dec = mlp_with(layer)
    z = codes(1)
    brute = brute_jacobian(dec, z, create_graph=True)
    probe = torch.randn_like(brute)
    reference = gradients_of(brute, dec, z, probe)
    J = forward_ad_jacobian(dec, z)
    assert_close("forward_ad J", brute, J)
    assert (gradients_of(J, dec, z, probe)[0] - reference[0]).abs().max() > 1e-3, "forward_ad"
    hidden = jacobian_columns(lambda v: dec(v), z)[1]
    assert_close("hidden J", brute, hidden)
    assert_same_gradients("jacobian_columns, hidden", reference, gradients_of(hidden, dec, z, probe))
