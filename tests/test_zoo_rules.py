"""The op table (fastjac/_rules.py): each rule against torch's own op and brute force, the
double-VJP fallback, and one canary per torch problem: a canary fails once torch fixes the
problem, saying which rule can then be dropped."""
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vmap

import fastjac
from fastjac import _rules
from fastjac.chunked import recomputed_columns
from fastjac.jacobian import ForwardADFallbackWarning
from decoders import brute_jacobian
from utils import assert_close

B, d = 2, 4
DT = torch.float64


def codes(seed=0, shape=(B, d)):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def affine(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, dtype=DT, generator=g) + 0.5).requires_grad_(), torch.randn(n, dtype=DT, generator=g).requires_grad_()


class Functional(nn.Module):
    """z -> tanh(W z) reshaped to (B, 4, 2, 3) (channels-last strides if asked) -> op -> flat."""

    def __init__(self, op, channels_last=False):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.W = nn.Parameter(torch.randn(24, d, dtype=DT, generator=g))
        self.w, self.b = (nn.Parameter(p.detach()) for p in affine(4, 2))
        self.op, self.channels_last = op, channels_last

    def forward(self, z):
        h = torch.tanh(z @ self.W.T)
        h = h.reshape(-1, 2, 3, 4).permute(0, 3, 1, 2) if self.channels_last else h.reshape(-1, 4, 2, 3)
        return self.op(self, h).reshape(z.shape[0], -1)


OPS = {
    "layer_norm": lambda m, h: F.layer_norm(h, (2, 3), m.w[:3].repeat(2).reshape(2, 3), None),
    "group_norm": lambda m, h: F.group_norm(h, 2, m.w, m.b),
    "group_norm_channels_last": lambda m, h: F.group_norm(h, 2, m.w, m.b),
    "torch.group_norm": lambda m, h: torch.group_norm(h, 2, m.w, m.b, 1e-5, False),
    "instance_norm": lambda m, h: F.instance_norm(h, weight=m.w, bias=m.b),
    "batch_norm_eval": lambda m, h: F.batch_norm(h, m.b.detach() * 0.1, m.w.detach(), m.w, m.b, False),
    "sdpa": lambda m, h: F.scaled_dot_product_attention(h, h * m.w[:1], h * m.b[:1]),
    "sdpa_causal": lambda m, h: F.scaled_dot_product_attention(h, 2 * h, h, is_causal=True, scale=0.3),
    "sdpa_mask": lambda m, h: F.scaled_dot_product_attention(
        h, h, h, attn_mask=torch.tensor([[True, False], [True, True]])),
    "sdpa_gqa": lambda m, h: F.scaled_dot_product_attention(h, h[:, :2], h[:, 2:], enable_gqa=True),
}


def gradients(J, dec, z, probe):
    return torch.autograd.grad((J * probe).sum() + (J ** 2).sum(), [z, *dec.parameters()], allow_unused=True)


def assert_exact_columns_and_gradients(name, dec, J, z):
    brute = brute_jacobian(dec, z, create_graph=True)
    assert_close(f"{name} J", brute, J, rtol=1e-10)
    probe = torch.randn(brute.shape, dtype=DT, generator=torch.Generator().manual_seed(5))
    for i, (a, b) in enumerate(zip(gradients(J, dec, z, probe), gradients(brute, dec, z, probe))):
        if b is None:  # J does not depend on it (a bias); the stacked path may give exact zeros
            assert a is None or not a.abs().any(), f"{name} grad {i}"
        else:
            assert_close(f"{name} grad {i}", b, a, rtol=1e-9)


@pytest.mark.parametrize("op", list(OPS))
def test_each_rule_gives_torchs_values_and_exact_gradients_of_J(op):
    dec = Functional(OPS[op], channels_last=op.endswith("channels_last"))
    z = codes()
    with _rules.column_rules():
        ruled = dec(z)
    assert_close(f"{op} value", dec(z), ruled, rtol=1e-12)
    for form, call in (("module", dec), ("lambda", lambda v: dec(v)), ("partial", functools.partial(dec))):
        out, J = fastjac.jacobian_columns(call, z)
        assert_close(f"{op} out", dec(z), out, rtol=1e-12)
        assert_exact_columns_and_gradients(f"{op} {form}", dec, J, z)


def test_rules_stay_active_when_checkpoint_recomputes_the_chunks():
    dec = Functional(OPS["layer_norm"])
    z = codes(1)
    _, J = recomputed_columns(lambda v: dec(v), z, chunk_size=1)
    assert_exact_columns_and_gradients("recomputed layer_norm", dec, J, z)


class Cube(torch.autograd.Function):
    """A user's custom op with a backward (itself differentiable) but no jvp/vmap rule."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * grad


def test_an_op_without_forward_ad_falls_back_to_double_vjp_with_one_warning():
    torch.manual_seed(0)
    lin = nn.Linear(d, 6).double()

    def dec(z):
        return torch.tanh(Cube.apply(lin(z)))

    z = codes(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, J = fastjac.jacobian_columns(dec, z)
        _, J2 = fastjac.jacobian_columns(lambda v: dec(v), z, torch.tensor([1, 3]))
    named = [w for w in caught if issubclass(w.category, ForwardADFallbackWarning)]
    assert len(named) == 1 and "autograd.Function" in str(named[0].message)
    assert_close("fallback subset", J[..., [1, 3]], J2)
    brute = brute_jacobian(dec, z, create_graph=True)
    assert_close("fallback J", brute, J)
    probe = torch.randn_like(brute)
    want = torch.autograd.grad((brute * probe).sum() + (brute ** 2).sum(), [z, lin.weight, lin.bias])
    got = torch.autograd.grad((J * probe).sum() + (J ** 2).sum(), [z, lin.weight, lin.bias])
    for a, b in zip(got, want):
        assert_close("fallback grad", b, a)
    with torch.no_grad():
        assert not fastjac.jacobian_columns(dec, z)[1].requires_grad


def test_an_op_without_forward_ad_nor_double_backward_raises_a_clear_error():
    torch.manual_seed(0)
    lin = nn.Linear(d, 6).double()
    anchors = torch.randn(3, 2, dtype=DT)

    def dec(z):  # cdist: no forward-AD formula and no double backward in torch 2.13
        return torch.cdist(torch.tanh(lin(z)).reshape(-1, 3, 2), anchors).reshape(z.shape[0], -1)

    with pytest.warns(ForwardADFallbackWarning, match="_cdist_forward"), \
            pytest.raises(NotImplementedError, match="_cdist_forward has no forward-AD formula.*_cdist_backward"):
        fastjac.jacobian_columns(dec, codes(2))


def test_hidden_batchnorm_in_training_mode_is_refused_by_the_rule():
    bn = nn.BatchNorm1d(6).double().train()
    lin = nn.Linear(d, 6).double()
    with pytest.raises(ValueError, match=r"in place.*BatchNorm.*eval\(\)"):
        fastjac.jacobian_columns(lambda z: bn(lin(z)), codes())


def test_no_other_python_level_torch_function_hides_a_ruled_op():
    """The mode cannot see inside Python-level torch functions (see ColumnRules): each one of
    torch.nn.functional whose body calls a ruled op must itself be in the table."""
    import ast
    import inspect
    ruled = {getattr(f, "__name__", "") for f in _rules.RULES}
    tree = ast.parse(inspect.getsource(F))
    hiding = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name not in ruled:
            names = {getattr(c.func, "attr", getattr(c.func, "id", None)) for c in ast.walk(node) if isinstance(c, ast.Call)}
            if names & ruled:
                hiding.add(node.name)
    assert not hiding, f"add a rule for {sorted(hiding)} to fastjac/_rules.py"


# --- canaries: each asserts a torch problem a rule works around is still there ------------------

def _plain_columns(f, z):
    eye = torch.eye(z.shape[1], dtype=DT).expand(z.shape[0], -1, -1).permute(2, 0, 1)
    _, cols = vmap(lambda v: jvp(f, (z,), (v,)), out_dims=(None, 0))(eye)
    return cols.reshape(cols.shape[0], z.shape[0], -1).permute(1, 2, 0)


@pytest.mark.parametrize("op", ["layer_norm", "instance_norm"])
def test_canary_torch_norm_formulas_give_wrong_gradients_of_J(op):
    dec = Functional(OPS[op])
    z = codes(3)
    J, brute = _plain_columns(dec, z), brute_jacobian(dec, z, create_graph=True)
    assert_close("J", brute, J)  # the values are right ...
    probe = torch.randn_like(brute)
    err = (gradients(J, dec, z, probe)[0] - gradients(brute, dec, z, probe)[0]).abs().max()
    assert err > 1e-3, f"torch fixed the second derivatives of {op}: its rule in fastjac/_rules.py can go"


def test_canary_group_norm_fails_on_channels_last_input_under_forward_ad():
    dec = Functional(OPS["group_norm"], channels_last=True)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        _plain_columns(dec, codes())
    # if this fails, torch fixed it: the group_norm rule is then only needed for uniformity


def test_canary_sdpa_has_no_forward_ad_formula_on_the_cpu():
    dec = Functional(OPS["sdpa"])
    with pytest.raises(NotImplementedError, match="forward AD"):
        _plain_columns(dec, codes())


def test_canary_transformer_fast_path_has_no_forward_ad_formula():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double().eval()
    x = torch.randn(2, 3, 8, dtype=DT)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="_transformer_encoder_layer_fwd"):
        jvp(layer, (x,), (torch.randn_like(x),))
    with torch.no_grad():  # fastjac turns the fast path off and gets exact columns
        _, J = fastjac.jacobian_columns(lambda z: layer(z.reshape(2, 3, 8)).reshape(2, -1), x.reshape(2, -1))
    assert_close("transformer", brute_jacobian(lambda z: layer(z.reshape(-1, 3, 8)).reshape(z.shape[0], -1),
                                               x.reshape(2, -1)), J)
