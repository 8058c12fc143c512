"""Every bad input of the foundation contract raises ValueError/TypeError naming the argument."""
import pytest
import torch

import fastjac
from utils import mlp_decoder

DEC = mlp_decoder(3, 6)
Z = torch.randn(4, 3, dtype=torch.float64)
X = torch.randn(4, 6, dtype=torch.float64)
J = torch.randn(4, 6, 3, dtype=torch.float64)
NAN_J = J.clone()
NAN_J[1, 2, 0] = float("nan")
INF_Z = Z.clone()
INF_Z[0, 0] = float("inf")

BAD = [
    ("beta", lambda: fastjac.logdet_gram(J, 0.0), ValueError),
    ("beta", lambda: fastjac.logdet_gram(J, -1.0), ValueError),
    ("beta", lambda: fastjac.logdet_gram(J, float("nan")), ValueError),
    ("beta", lambda: fastjac.logdet_gram(J, float("inf")), ValueError),
    ("beta", lambda: fastjac.logdet_gram(J, torch.tensor(-0.5)), ValueError),
    ("beta", lambda: fastjac.logdet_gram(J, torch.ones(2)), ValueError),
    ("beta", lambda: fastjac.grae_loss(DEC, Z, X, "1"), TypeError),
    ("J", lambda: fastjac.logdet_gram(J[0], 1.0), ValueError),
    ("J", lambda: fastjac.hadamard_bound(J.unsqueeze(0), 1.0), ValueError),
    ("J", lambda: fastjac.logdet_gram(J.long(), 1.0), TypeError),
    ("J", lambda: fastjac.logdet_gram(J.numpy(), 1.0), TypeError),
    ("J", lambda: fastjac.logdet_gram(torch.zeros(0, 3, 2), 1.0), ValueError),
    ("J", lambda: fastjac.logdet_gram(NAN_J, 1.0), ValueError),
    ("J", lambda: fastjac.orthogonality_penalty(NAN_J), ValueError),
    ("weights", lambda: fastjac.logdet_gram(J, 1.0, weights=torch.ones(4, 5, dtype=torch.float64)), ValueError),
    ("weights", lambda: fastjac.logdet_gram(J, 1.0, weights=-torch.ones(4, 6, dtype=torch.float64)), ValueError),
    ("weights", lambda: fastjac.logdet_gram(J, 1.0, weights=-2.0), ValueError),
    ("block_size", lambda: fastjac.fischer_bound(J, 1.0, block_size=0), ValueError),
    ("block_size", lambda: fastjac.orthogonality_penalty(J, block_size=3), ValueError),
    ("probabilities", lambda: fastjac.column_estimate(J, 1.0, probabilities=0.0), ValueError),
    ("probabilities", lambda: fastjac.column_estimate(J, 1.0, probabilities=torch.ones(5)), ValueError),
    ("z", lambda: fastjac.grae_loss(DEC, Z[0], X, 1.0), ValueError),
    ("z", lambda: fastjac.grae_loss(DEC, INF_Z, X, 1.0), ValueError),
    ("z", lambda: fastjac.jacobian_columns(DEC, INF_Z), ValueError),
    ("batch size", lambda: fastjac.grae_loss(DEC, Z, X[:3], 1.0), ValueError),
    ("x", lambda: fastjac.grae_loss(DEC, Z, torch.randn(4, 5, dtype=torch.float64), 1.0), ValueError),
    ("x", lambda: fastjac.grae_loss(DEC, Z, None, 1.0), ValueError),
    ("columns", lambda: fastjac.jacobian_columns(DEC, Z, torch.tensor([0, 3])), ValueError),
    ("columns", lambda: fastjac.jacobian_columns(DEC, Z, torch.tensor([[-1]] * 4)), ValueError),
    ("columns", lambda: fastjac.jacobian_columns(DEC, Z, torch.tensor([[0]] * 3)), ValueError),
    ("columns", lambda: fastjac.jacobian_columns(DEC, Z, torch.tensor([0.5])), TypeError),
    ("directions", lambda: fastjac.jacobian_columns(DEC, Z, directions=torch.randn(4, 2, 1)), ValueError),
    ("either columns or directions", lambda: fastjac.jacobian_columns(
        DEC, Z, torch.tensor([0]), directions=torch.randn(4, 3, 1)), ValueError),
    ("num_columns", lambda: fastjac.grae_loss(DEC, Z, X, 1.0, estimator="stochastic", num_columns=0), ValueError),
    ("num_columns", lambda: fastjac.grae_loss(DEC, Z, X, 1.0, num_columns=1.5), TypeError),
    ("estimator", lambda: fastjac.grae_loss(DEC, Z, X, 1.0, estimator="magic"), ValueError),
    ("observation", lambda: fastjac.grae_loss(DEC, Z, X, 1.0, observation="poisson"), ValueError),
    ("observation", lambda: fastjac.grae_loss(DEC, Z, X, 1.0, observation=object()), TypeError),
    ("reduction", lambda: fastjac.grae_loss(DEC, Z, X, 1.0, reduction="max"), ValueError),
    ("orthogonality_weight", lambda: fastjac.grae_loss(DEC, Z, X, 1.0, orthogonality_weight=-1), ValueError),
    ("decoder", lambda: fastjac.grae_loss("not a decoder", Z, X, 1.0), TypeError),
    ("x is required", lambda: fastjac.jacobian_regularizer(DEC, Z, 1.0, observation="bernoulli"), ValueError),
    ("scale_tril", lambda: fastjac.beta_vae_loss(DEC, Z, torch.eye(3).expand(4, 3, 3).mT.double() * 2
                                                 + torch.ones(3, 3).triu(1).double(), X, 1.0), ValueError),
    ("scale_tril", lambda: fastjac.taylor_beta_vae_loss(DEC, Z, -torch.eye(3, dtype=torch.float64).expand(4, 3, 3),
                                                        X, 1.0), ValueError),
    ("scale_tril", lambda: fastjac.beta_vae_loss(DEC, Z, torch.eye(3, dtype=torch.float64).expand(3, 3, 3),
                                                 X, 1.0), ValueError),
    ("num_samples", lambda: fastjac.beta_vae_loss(DEC, Z, torch.eye(3, dtype=torch.float64).expand(4, 3, 3),
                                                  X, 1.0, num_samples=0), ValueError),
]


@pytest.mark.parametrize("argument,call,error", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_raises_clearly(argument, call, error):
    copies = [t.clone() for t in (Z, X, J)]
    with pytest.raises(error, match=argument):
        call()
    assert all(torch.equal(a, b) for a, b in zip(copies, (Z, X, J))), "an input tensor was modified"


def test_decoder_that_drops_the_batch_dimension_is_refused():
    with pytest.raises(ValueError, match="batch size"):
        fastjac.jacobian_columns(lambda z: z.sum(0), Z)


def test_checks_can_be_switched_off():
    with fastjac.checks(False):  # the reference propagates NaN instead of paying for a check
        out = fastjac.logdet_gram(NAN_J, 1.0, backend="torch")
    assert torch.isnan(out[1])
    with pytest.raises(ValueError):
        fastjac.logdet_gram(NAN_J, 1.0)
