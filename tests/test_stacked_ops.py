"""The stacked evaluation of any decoder (fastjac/autodiff/stacked_ops.py), rule by rule, in float64:
primal and tangent outputs, and their gradients into the input and the parameters, against
``torch.func.jvp`` (under fastjac's op rules, as the fallback runs it); torch.autograd's gradcheck
and gradgradcheck on small cases; and every refusal: what has no rule, or whose precondition fails,
raises ``Unsupported`` and jacobian_columns gives torch.func's answer instead."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastjac
from fastjac import jacobian
from fastjac._rules import column_rules
from fastjac.autodiff import stacked_ops
from fastjac.autodiff.stacked_ops import Unsupported
from utils import assert_close

DT = torch.float64


def param(*shape, positive=False):
    p = torch.randn(*shape, dtype=DT)
    return (p.abs() + 0.5 if positive else p).requires_grad_()


# name -> () -> (f, z shape, parameters): f acts per sample on z (B, *shape)
def _conv():
    w, b = param(3, 2, 3, 3), param(3)
    return lambda x: F.conv2d(x, w, b, padding=1), (2, 4, 4), [w, b]


def _conv_transpose():
    w, b = param(2, 3, 4, 4), param(3)
    return lambda x: F.conv_transpose2d(x, w, b, stride=2, padding=1), (2, 3, 3), [w, b]


def _linear():
    w, b = param(5, 4), param(5)
    return lambda x: F.linear(x, w, b), (4,), [w, b]


def _conv1d_reflect():
    conv = nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect").to(DT)
    return conv, (2, 5), list(conv.parameters())


def _group_norm():
    w, b = param(4, positive=True), param(4)
    return lambda x: F.group_norm(x, 2, w, b), (4, 3, 3), [w, b]


def _group_norm_channels_last():
    w = param(4, positive=True)
    return lambda x: F.group_norm(x.permute(0, 3, 1, 2), 2, w, None), (3, 3, 4), [w]


def _group_norm_bias_only():
    """No weight, a bias (native_group_norm's statistics outputs fail in backward here)."""
    b = param(4)
    return lambda x: F.group_norm(x, 2, None, b), (4, 6), [b]


def _layer_norm_plain():
    return lambda x: F.layer_norm(x, (4,)), (3, 4), []


def _layer_norm():
    w, b = param(3, 4, positive=True), param(3, 4)
    return lambda x: F.layer_norm(x, (3, 4), w, b), (2, 3, 4), [w, b]


def _instance_norm():
    norm = nn.InstanceNorm2d(3, affine=True).to(DT)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.normal_()
    return norm, (3, 3, 3), list(norm.parameters())


def _batch_norm_eval():
    norm = nn.BatchNorm2d(3).to(DT)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
    return norm.eval(), (3, 2, 2), list(norm.parameters())


def _activation(fn):
    return lambda: (fn, (3, 4), [])


ACTIVATIONS = {
    "silu": F.silu, "relu": F.relu, "relu_method": lambda x: x.relu(), "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "elu": functools.partial(F.elu, alpha=0.7),
    "leaky_relu": functools.partial(F.leaky_relu, negative_slope=0.2), "softplus": functools.partial(F.softplus, beta=2.0),
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "tanh_method": lambda x: x.tanh(),
    "exp": torch.exp, "log_abs": lambda x: torch.log(x.abs() + 1), "sin_cos": lambda x: x.sin() * x.cos(),
    "sqrt_square": lambda x: (torch.square(x) + 1).sqrt(), "pow": lambda x: x ** 3 + (x.abs() + 1).pow(0.5),
    "reciprocal": lambda x: 2.0 / (abs(x) + 1), "clamp": lambda x: x.clamp(-0.5, 0.7) + torch.clip(x, min=0.1),
    "hardtanh": functools.partial(F.hardtanh, min_val=-0.4),
}


def _arithmetic():
    c, s = param(3, 1), param(1, 4)

    def f(x):
        y = x + c  # a constant per row: primal rows only
        y = 2.0 - y * s + x / 3  # rsub, mul by a constant, div by a scalar
        y = y * torch.tanh(x)  # product rule
        return -(y - x.sum(-1, keepdim=True)) / c.abs().add(1)
    return f, (3, 4), [c, s]


def _per_sample_constants():
    """Constants with one row per sample (B = 2): added, multiplied, concatenated."""
    c = param(2, 3)

    def f(x):
        return torch.cat([x * c + c, c], -1).tanh()
    return f, (3,), [c]


def _matmul_softmax():
    w = param(4, 4)

    def f(x):  # x (B, L = 3, 4): self-attention by hand
        q, k = x @ w, torch.tanh(x)
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return torch.bmm(a, x) + torch.baddbmm(x, a, k, beta=0.5, alpha=2.0) + torch.baddbmm(x, a, k, beta=0)
    return f, (3, 4), [w]


def _constant_left_matmul():
    m = param(2, 3)
    return lambda x: m @ x, (3, 4), [m]


def _sdpa(is_causal=False, mask=False):
    wq, wk, wv = param(4, 4), param(4, 4), param(4, 4)
    m = torch.randn(3, 3, dtype=DT) if mask else None

    def f(x):  # (B, heads, L, d) as diffusers' AttnProcessor2_0 does it
        q, k, v = (F.linear(x, w).view(x.shape[0], -1, 2, 2).transpose(1, 2) for w in (wq, wk, wv))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal)
        return o.transpose(1, 2).reshape(x.shape[0], -1, 4)
    return f, (3, 4), [wq, wk, wv]


def _resampling():
    def f(x):  # (B, 4, 3, 3)
        y = F.interpolate(x, scale_factor=2.0, mode="nearest") + F.interpolate(x, size=(6, 6), mode="bilinear")
        y = F.pixel_shuffle(y, 2)  # (B, 1, 12, 12)
        y = F.avg_pool2d(F.pad(y, (1, 1, 1, 1), mode="reflect"), 2)
        return F.adaptive_avg_pool2d(y, 3).flatten(1)
    return f, (4, 3, 3), []


def _shapes():
    def f(x):  # (B, 2, 3, 4)
        a, b = x.chunk(2, dim=1)
        c, d = x.split([1, 2], dim=2)
        y = torch.cat([a.permute(0, 3, 1, 2).contiguous().view(x.shape[0], -1), b.reshape(x.shape[0], -1),
                       c.flatten(1), d.unflatten(2, (1, 2)).flatten(1), x[:, 1, ..., :2].flatten(1),
                       torch.stack([x[..., 0], x[..., 1]], dim=-1).flatten(1), x.mean((2, 3)), x.mT.sum(-1).flatten(1)],
                      dim=1)
        return y.to(torch.float32).to(DT).unsqueeze(1).squeeze(1) + x.detach().sum((1, 2, 3)).unsqueeze(-1)
    return f, (2, 3, 4), []


def _masked_fill():
    mask = torch.rand(3, 4) < 0.3
    return lambda x: torch.tanh(x).masked_fill(mask, 0.5), (3, 4), []


def _dropout_eval():
    drop = nn.Dropout(0.5).eval()
    return lambda x: F.dropout(drop(x), 0.0, training=True) * 2, (3, 4), []


CASES = {
    "conv2d": _conv, "conv_transpose2d": _conv_transpose, "linear": _linear, "conv1d_reflect": _conv1d_reflect,
    "group_norm": _group_norm, "group_norm_channels_last": _group_norm_channels_last, "layer_norm": _layer_norm,
    "group_norm_bias_only": _group_norm_bias_only, "layer_norm_plain": _layer_norm_plain,
    "instance_norm": _instance_norm, "batch_norm_eval": _batch_norm_eval,
    **{f"act_{n}": _activation(fn) for n, fn in ACTIVATIONS.items()},
    "arithmetic": _arithmetic, "per_sample_constants": _per_sample_constants, "matmul_softmax": _matmul_softmax,
    "constant_left_matmul": _constant_left_matmul, "sdpa": _sdpa, "sdpa_causal": functools.partial(_sdpa, True),
    "sdpa_mask": functools.partial(_sdpa, mask=True), "resampling": _resampling, "shapes": _shapes,
    "masked_fill": _masked_fill, "dropout_eval": _dropout_eval,
}


def build(name, B=2, k=3, seed=0):
    torch.manual_seed(seed)
    f, shape, params = CASES[name]()
    z = torch.randn(B, *shape, dtype=DT, requires_grad=True)
    tangents = torch.randn(k, B, *shape, dtype=DT, requires_grad=True)
    return f, z, tangents, params


def stacked_push(f, z, tangents):
    return stacked_ops.push(f, lambda out: out, z, tangents)


def reference_push(f, z, tangents):
    with column_rules():
        return torch.func.vmap(lambda t: torch.func.jvp(f, (z,), (t,)), out_dims=(None, 0),
                               randomness="same")(tangents)


def unit_tangents(z):
    """(d, B, d): tangent j is e_j for every sample."""
    d = z.shape[1]
    return torch.eye(d, dtype=z.dtype).unsqueeze(1).expand(d, z.shape[0], d)


def gradients(outputs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, dtype=DT, generator=g)).sum() + (o ** 2).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_torch_func_values_and_gradients(name, k):
    f, z, tangents, params = build(name, k=k)
    ours, ref = stacked_push(f, z, tangents), reference_push(f, z, tangents)
    assert not isinstance(ours[0], stacked_ops.Stacked) and not isinstance(ours[1], stacked_ops.Stacked)
    assert_close("out", ref[0], ours[0])
    assert_close("tangents", ref[1], ours[1])
    inputs = [z, tangents, *params]
    for i, (a, b) in enumerate(zip(gradients(ours, inputs), gradients(ref, inputs))):
        if b is None:
            assert a is None or a.abs().max() == 0, f"grad {i}"
        else:
            assert_close(f"grad {i}", b, a)


@pytest.mark.parametrize("name", ["group_norm", "layer_norm", "instance_norm", "act_silu", "act_gelu",
                                  "matmul_softmax", "sdpa", "conv2d", "arithmetic"])
def test_rule_is_twice_differentiable(name):
    """gradcheck / gradgradcheck of (z, t) -> (out, J t): reverse mode through the stacked
    evaluation is exact to second order (GRAE's gradient needs the first)."""
    f, z, tangents, _ = build(name, B=1, k=1)

    def pushed(z, t):
        return stacked_push(f, z, t)
    assert torch.autograd.gradcheck(pushed, (z, tangents))
    assert torch.autograd.gradgradcheck(pushed, (z, tangents))


class Refused(nn.Module):
    """Runs ``op`` on the hidden state of a small decoder: what the stacked evaluation must refuse."""

    def __init__(self, op):
        super().__init__()
        self.fc, self.op = nn.Linear(3, 6), op

    def forward(self, z):
        return torch.tanh(self.op(self.fc(z)))


def _inplace_into_constant(h):
    buf = torch.zeros(h.shape[1], dtype=h.dtype)
    buf[:] = h[0]
    return h * buf


class Twice(torch.autograd.Function):
    """A user's op with its own backward (and jvp, for torch.func): under the stacked rules its
    forward would run stacked while its backward assumes plain rows, so it must be refused."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad * 2

    @staticmethod
    def jvp(ctx, tangent):
        return tangent * 2


def _no_grad_block(h):
    with torch.no_grad():
        scale = torch.tanh(h) + 2
    return h * scale


REFUSED = {
    "autograd.Function": lambda h: Twice.apply(h),
    "no_grad block": _no_grad_block,
    "no rule (cumsum)": lambda h: torch.cumsum(h, 1),
    "permute moving the batch": lambda h: h.reshape(-1, 2, 3).permute(1, 0, 2).reshape(-1, 6),
    "reshape mixing the batch": lambda h: h.reshape(-1, 12).flip(-1).reshape(-1, 6),
    "transpose of the batch": lambda h: h.t().t(),
    "item": lambda h: h * h.sum().item(),
    "branch on a value": lambda h: h if bool((h > 0).all()) else -h,
    "in-place on the stack": lambda h: h.add_(1),
    "in-place into a constant": _inplace_into_constant,
    "relu in place": lambda h: F.relu(h, inplace=True),
    "dropout in training": lambda h: F.dropout(h, 0.5, training=True),
    "batch_norm with batch statistics": lambda h: F.batch_norm(h, None, None, training=True),
    "softmax over the batch": lambda h: torch.softmax(h, 0),
    "cat along the batch": lambda h: torch.cat([h, h])[: h.shape[0]],
    "constant the size of the stack": lambda h: h + torch.ones(h.shape[0], 1, dtype=h.dtype),
    "mean over everything": lambda h: h - h.mean(),
    "division by a stacked tensor": lambda h: h / (2 + torch.tanh(h)),
    "a stacked exponent": lambda h: torch.pow(2.0, h),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_calls_raise_and_fall_back_to_torch_func(case):
    torch.manual_seed(0)
    dec = Refused(REFUSED[case]).to(DT)
    z = torch.randn(2, 3, dtype=DT)
    with pytest.raises(Unsupported):
        stacked_push(dec, z, torch.randn(2, 2, 3, dtype=DT))
    stacked_ops.DECISIONS.clear()
    torch.manual_seed(1)  # the dropout case: the fallback draws the mask the failed attempt drew
    out, J = fastjac.jacobian_columns(dec, z)
    key = stacked_ops.cache_key(dec, None, z, 3)
    assert stacked_ops.DECISIONS.get(key) is False  # decided once: later calls go straight to torch.func
    torch.manual_seed(1)
    ref_out, ref_cols = reference_push(dec, z, unit_tangents(z))  # what the fallback computes
    assert_close("J", ref_cols.permute(1, 2, 0), J)
    assert_close("out", ref_out, out)


def test_a_failed_attempt_is_made_once_per_decoder_structure(monkeypatch):
    attempts = []
    real = stacked_ops.push

    def counted(*args):
        attempts.append(1)
        return real(*args)
    monkeypatch.setattr(stacked_ops, "push", counted)
    stacked_ops.DECISIONS.clear()
    z = torch.randn(2, 3, dtype=DT)
    for seed in range(3):  # three decoders of one structure
        torch.manual_seed(seed)
        fastjac.jacobian_columns(Refused(REFUSED["no rule (cumsum)"]).to(DT), z)
    assert len(attempts) == 1


def test_stacked_path_is_taken_and_matches_for_a_residual_decoder(monkeypatch):
    """A non-Sequential decoder through jacobian_columns takes the stacked path, with the forward-AD
    path never called, and gives torch.func's columns."""
    calls = []
    monkeypatch.setattr(jacobian, "_forward_ad_push", lambda *a: calls.append(1) or pytest.fail("forward AD"))

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm, self.conv = nn.Linear(3, 8 * 4), nn.GroupNorm(2, 8), nn.Conv1d(8, 8, 3, padding=1)

        def forward(self, z):
            h = self.fc(z).view(z.shape[0], 8, 4)
            return (h + self.conv(F.silu(self.norm(h)))).flatten(1)
    torch.manual_seed(0)
    dec, z = Res().to(DT), torch.randn(3, 3, dtype=DT)
    out, J = fastjac.jacobian_columns(dec, z)
    monkeypatch.undo()
    ref = reference_push(dec, z, unit_tangents(z))
    assert_close("J", ref[1].flatten(2).permute(1, 2, 0), J)
    assert not calls


def test_stale_stacked_tensors_of_another_pass_are_refused():
    kept = {}

    def dec(x):
        y = torch.tanh(x)
        out = y + kept["y"] if "y" in kept else y
        kept["y"] = y
        return out
    z = torch.randn(2, 3, dtype=DT)
    stacked_push(dec, z, torch.randn(1, 2, 3, dtype=DT))
    with pytest.raises(Unsupported):
        stacked_push(dec, z, torch.randn(1, 2, 3, dtype=DT))


def test_decoders_with_hooks_go_to_torch_func(monkeypatch):
    """A forward hook would see the stacked rows (and might keep them): torch.func instead."""
    seen = []
    torch.manual_seed(0)
    dec = Refused(torch.sin).to(DT)  # sin has no rule, but the hook is checked first
    dec.fc.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    monkeypatch.setattr(stacked_ops, "push", lambda *a: pytest.fail("stacked attempt"))
    fastjac.jacobian_columns(dec, torch.randn(2, 3, dtype=DT))
    assert seen == [2]


@pytest.mark.parametrize("op", ["no rule (cumsum)", None])
def test_checkpointed_chunks_take_one_path_and_give_the_same_gradients(op):
    """recomputed_columns checkpoints each chunk: the stacked decision is made before any tensor is
    saved (a failed attempt under checkpoint would leave saved tensors the recomputation lacks)."""
    from fastjac.chunked import recomputed_columns
    torch.manual_seed(0)
    dec = Refused(REFUSED[op] if op else torch.tanh).to(DT)
    z = torch.randn(2, 3, dtype=DT, requires_grad=True)
    stacked_ops.DECISIONS.clear()
    _, J = recomputed_columns(lambda v: dec(v), z, chunk_size=2)
    grads = torch.autograd.grad((J ** 2).sum(), [z, *dec.parameters()])
    stacked_ops.DECISIONS.clear()
    _, J_ref = fastjac.jacobian_columns(dec, z)
    for a, b in zip(grads, torch.autograd.grad((J_ref ** 2).sum(), [z, *dec.parameters()])):
        assert_close("grad", b, a)
    assert stacked_ops.DECISIONS.get(stacked_ops.cache_key(dec, None, z, 3)) is (op is None)
