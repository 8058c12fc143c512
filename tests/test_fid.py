"""The FID Inception-v3 (fastjac.experiments.inception) and the Fréchet distance.

No weights are downloaded: the architecture is checked with random weights (shapes of every stage,
a float32 forward against a float64 recomputation, each block type against a functional
recomputation), loading goes through a state dict saved here, and the Fréchet formula is checked
against scipy.linalg.sqrtm."""
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from fastjac.experiments import inception
from fastjac.experiments.frechet import frechet_distance


def _randomised(net, seed=0):
    """Random weights and batch-norm statistics (so every BN is a non-trivial affine map)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                elif name.endswith("conv.weight"):
                    fan_in = t[0].numel()
                    t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                else:
                    t.copy_(0.1 * torch.randn(t.shape, generator=g) + (1.0 if name.endswith("bn.weight") else 0))
    return net.eval()


@pytest.fixture(scope="module")
def net():
    return _randomised(inception.FIDInceptionV3())


def test_stage_shapes_and_pool_features(net):
    seen = {}
    hooks = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, tuple(o.shape)))
             for n in ("Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c")]
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x)
    for h in hooks:
        h.remove()
    assert out.shape == (1, inception.FEATURES)
    assert seen == {"Conv2d_4a_3x3": (1, 192, 71, 71), "Mixed_5d": (1, 288, 35, 35),
                    "Mixed_6e": (1, 768, 17, 17), "Mixed_7c": (1, 2048, 8, 8)}
    # torchvision inception_v3(aux_logits=False): 23 834 568 parameters, less fc (2048·1000 + 1000)
    assert sum(p.numel() for p in net.parameters()) == 23_834_568 - 2_049_000


def test_float32_forward_matches_a_float64_recomputation(net):
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = net(x)
        want = _randomised(inception.FIDInceptionV3()).double()(x.double())
    assert got.dtype == torch.float32 and torch.isfinite(got).all() and got.abs().max() > 0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    # one grey image = the same image in three equal channels
    torch.testing.assert_close(net(x[:1]), net(x[:1].expand(-1, 3, -1, -1)))


def _basic(block, x):
    """conv → batch norm (eval, ε = 0.001) → ReLU, written out."""
    w, bn = block.conv.weight.double(), block.bn
    y = F.conv2d(x, w, stride=block.conv.stride, padding=block.conv.padding)
    scale = bn.weight.double() / (bn.running_var.double() + 0.001).sqrt()
    shift = bn.bias.double() - bn.running_mean.double() * scale
    return (y * scale[:, None, None] + shift[:, None, None]).clamp_min(0)


def _mean_without_padding(x):
    ones = torch.ones_like(x[:, :1])
    return F.avg_pool2d(x, 3, 1, 1, divisor_override=1) / F.avg_pool2d(ones, 3, 1, 1, divisor_override=1)


def test_blocks_match_a_functional_recomputation_with_the_fid_pooling(net):
    """A/C/E(7b) average without counting padding, E(7c) takes the max: pytorch-fid's layout."""
    g = torch.Generator().manual_seed(3)
    xa = torch.randn(1, 288, 9, 9, generator=g, dtype=torch.float64)
    a = net.Mixed_5d
    want = torch.cat([_basic(a.branch1x1, xa), _basic(a.branch5x5_2, _basic(a.branch5x5_1, xa)),
                      _basic(a.branch3x3dbl_3, _basic(a.branch3x3dbl_2, _basic(a.branch3x3dbl_1, xa))),
                      _basic(a.branch_pool, _mean_without_padding(xa))], 1)
    torch.testing.assert_close(a.double()(xa), want)
    for e, pooled in ((net.Mixed_7b, _mean_without_padding),
                      (net.Mixed_7c, lambda t: F.max_pool2d(t, 3, 1, 1))):
        xe = torch.randn(1, e.branch1x1.conv.in_channels, 5, 5, generator=g, dtype=torch.float64)
        b3 = _basic(e.branch3x3_1, xe)
        d = _basic(e.branch3x3dbl_2, _basic(e.branch3x3dbl_1, xe))
        want = torch.cat([_basic(e.branch1x1, xe), _basic(e.branch3x3_2a, b3), _basic(e.branch3x3_2b, b3),
                          _basic(e.branch3x3dbl_3a, d), _basic(e.branch3x3dbl_3b, d),
                          _basic(e.branch_pool, pooled(xe))], 1)
        torch.testing.assert_close(e.double()(xe), want)
    net.float()


def test_weights_load_from_a_path_and_bad_files_are_refused(net, tmp_path):
    state = dict(net.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # pytorch-fid's
    torch.save(state, tmp_path / "fid.pt")
    loaded = inception.fid_inception_v3(tmp_path / "fid.pt")
    assert not loaded.training
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(ValueError, match="not a file"):
        inception.fid_inception_v3(tmp_path / "absent.pt")
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="missing"):
        inception.fid_inception_v3(tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="shape"):
        net(torch.rand(1, 2, 8, 8))


def _scipy_frechet(a, b):
    ma, mb = a.mean(0), b.mean(0)
    Sa, Sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = scipy.linalg.sqrtm(Sa @ Sb).real
    return float(((ma - mb) ** 2).sum() + np.trace(Sa + Sb - 2 * root))


@pytest.mark.parametrize("dim", [1, 3, 16, 64])
def test_frechet_distance_matches_scipy_sqrtm_on_random_gaussians(dim):
    rng = np.random.default_rng(dim)
    A, B = rng.standard_normal((dim, dim)), rng.standard_normal((dim, dim))
    a = rng.standard_normal((400, dim)) @ A + rng.standard_normal(dim)
    b = rng.standard_normal((300, dim)) @ B * 0.5
    want = _scipy_frechet(a, b)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-7, abs=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-7 * np.trace(np.atleast_2d(np.cov(a, rowvar=False))))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
