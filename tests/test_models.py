import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from core.encoder import ContextEncoder, EncoderConfig, Gaussian
from core.losses import LOG2, btl_nll, gaussian_kl, np_elbo_loss, probit_nll, probit_prob
from core.reward import PairFeatures, PreferenceModel, RewardConfig, config_from_dict


def make_encoder(latent=False, aggregate="mean", **kw):
    torch.manual_seed(0)
    return ContextEncoder(EncoderConfig(d_in=3, d_hidden=16, d_z=5, n_heads=4, latent=latent,
                                        aggregate=aggregate, **kw)).eval()


def as_tensor(z):
    return torch.cat([z.mean, z.std], -1) if isinstance(z, Gaussian) else z


def context(B=4, N=6, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(B, N, d, generator=g), torch.randn(B, N, d, generator=g)
    choice = torch.randint(0, 2, (B, N), generator=g).float()
    choice[0, 0] = 0.5
    return a, b, choice


@pytest.mark.parametrize("latent", [False, True])
@pytest.mark.parametrize("aggregate", ["mean", "sum"])
def test_encoder_permutation_invariant(latent, aggregate):
    enc = make_encoder(latent, aggregate)
    a, b, c = context()
    mask = torch.ones(4, 6, dtype=torch.bool)
    perm = torch.randperm(6)
    z1 = as_tensor(enc(a, b, c, mask))
    z2 = as_tensor(enc(a[:, perm], b[:, perm], c[:, perm], mask))
    torch.testing.assert_close(z1, z2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("latent", [False, True])
def test_encoder_padding_invariant(latent):
    enc = make_encoder(latent)
    a, b, c = context()
    mask = torch.ones(4, 6, dtype=torch.bool)
    pad = 3
    junk = lambda x: torch.cat([x, 100 * torch.randn(x.shape[0], pad, *x.shape[2:])], 1)  # noqa: E731
    mask_p = torch.cat([mask, torch.zeros(4, pad, dtype=torch.bool)], 1)
    z1 = as_tensor(enc(a, b, c, mask))
    z2 = as_tensor(enc(junk(a), junk(b), torch.cat([c, torch.ones(4, pad)], 1), mask_p))
    torch.testing.assert_close(z1, z2, rtol=1e-5, atol=1e-6)
    # and masking the last pairs equals dropping them
    mask_short = mask.clone()
    mask_short[:, 4:] = False
    torch.testing.assert_close(as_tensor(enc(a, b, c, mask_short)), as_tensor(enc(a[:, :4], b[:, :4], c[:, :4], mask[:, :4])),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("latent", [False, True])
def test_empty_context_is_the_learned_prior(latent):
    enc = make_encoder(latent)
    with torch.no_grad():
        enc.prior_mean.copy_(torch.arange(5.0))
    a, b, c = context()
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, :2] = True  # one row has context, the others none
    z = enc(a, b, c, mask)
    prior = enc.prior(4)
    zt, pt = as_tensor(z), as_tensor(prior)
    for i in (0, 2, 3):
        torch.testing.assert_close(zt[i], pt[i])
    assert not torch.allclose(zt[1], pt[1])
    z0 = enc(a[:, :0], b[:, :0], c[:, :0], mask[:, :0])  # zero-width context
    torch.testing.assert_close(as_tensor(z0), pt)
    assert torch.isfinite(zt).all()


def test_tie_feature_is_symmetric_and_choice_flips_order():
    enc = make_encoder()
    a, b, _ = context()
    tie = torch.full((4, 6), 0.5)
    torch.testing.assert_close(enc.pair_features(a, b, tie), enc.pair_features(b, a, tie))
    ones = torch.ones(4, 6)
    torch.testing.assert_close(enc.pair_features(a, b, ones), enc.pair_features(b, a, 1 - ones))


def test_pair_features_equal_the_two_order_blend():
    """One MLP pass for decided pairs gives (1 - y) mlp[a | b] + y mlp[b | a], with ties in the batch or not,
    and the same gradients."""
    torch.manual_seed(3)
    enc = make_encoder()
    a, b, _ = context()

    def blend(a, b, y):
        a_n, b_n = enc.normalize(a), enc.normalize(b)
        y = y.unsqueeze(-1)
        return (1 - y) * enc.pair_mlp(torch.cat([a_n, b_n], -1)) + y * enc.pair_mlp(torch.cat([b_n, a_n], -1))

    decided = torch.randint(0, 2, (4, 6)).float()
    mixed = decided.clone()
    mixed[0, :3] = 0.5
    for y in (decided, mixed):
        torch.testing.assert_close(enc.pair_features(a, b, y), blend(a, b, y))
        g_new = torch.autograd.grad(enc.pair_features(a, b, y).square().sum(), list(enc.pair_mlp.parameters()))
        g_old = torch.autograd.grad(blend(a, b, y).square().sum(), list(enc.pair_mlp.parameters()))
        for x, w in zip(g_new, g_old):
            torch.testing.assert_close(x, w)


def test_latent_scale_floor():
    enc = make_encoder(latent=True, min_std=0.05)
    with torch.no_grad():
        for p in enc.head.parameters():
            p.fill_(-50.0)
    a, b, c = context()
    q = enc(a, b, c, torch.ones(4, 6, dtype=torch.bool))
    assert (q.std >= 0.05).all()


# -- losses ------------------------------------------------------------------------------

def test_btl_nll_closed_forms():
    zero = torch.zeros(3)
    torch.testing.assert_close(btl_nll(zero, torch.tensor([0.0, 1.0, 0.5])), torch.full((3,), LOG2))
    m = torch.tensor([2.0, -1.0, 0.3])
    y = torch.tensor([1.0, 0.0, 1.0])
    expected = -torch.log(torch.sigmoid(torch.where(y == 1, m, -m)))
    torch.testing.assert_close(btl_nll(m, y), expected)


def test_probit_matches_numerical_integration():
    mu_a, mu_b, sa, sb = 0.3, 0.8, 0.7, 1.3
    # p(r_b > r_a) = ∫ p_a(x) P(r_b > x) dx, by the trapezoid rule on a fine grid
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    pa = Normal(torch.tensor(mu_a, dtype=torch.float64), sa).log_prob(x).exp()
    tail = 1 - Normal(torch.tensor(mu_b, dtype=torch.float64), sb).cdf(x)
    p_num = torch.trapezoid(pa * tail, x).item()
    dmu, var = torch.tensor([mu_b - mu_a]), torch.tensor([sa**2 + sb**2])
    assert abs(probit_prob(dmu, var).item() - p_num) < 1e-6
    assert abs(probit_nll(dmu, var, torch.tensor([1.0])).item() + math.log(p_num)) < 1e-5
    assert abs(probit_nll(dmu, var, torch.tensor([0.0])).item() + math.log(1 - p_num)) < 1e-5
    # stable far in the tails
    assert torch.isfinite(probit_nll(torch.tensor([-60.0]), torch.tensor([1.0]), torch.tensor([1.0]))).all()


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mq, mp = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    sq, sp = torch.rand(4, 7, generator=g) + 0.1, torch.rand(4, 7, generator=g) + 0.1
    ref = kl_divergence(Normal(mq, sq), Normal(mp, sp)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mq, sq, mp, sp), ref)
    torch.testing.assert_close(gaussian_kl(mq, sq, mq, sq), torch.zeros(4), atol=1e-6, rtol=0)


def test_np_elbo_loss_formula():
    nll = torch.tensor([[[1.0, 2.0, 9.0]], [[3.0, 4.0, 9.0]]])  # (S=2, B=1, T=3)
    mask = torch.tensor([[True, True, False]])
    kl = torch.tensor([0.5])
    # E_S[nll] over real targets: (2 + 3) = 5; plus beta * KL = 1.0; per target: 6 / 2
    assert np_elbo_loss(nll, mask, kl, beta=2.0).item() == pytest.approx(3.0)


# -- models ------------------------------------------------------------------------------

def features(B=3, T=5, C=4, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return PairFeatures(r(B, T, d), r(B, T, d), torch.randint(0, 2, (B, T), generator=g).float(),
                        torch.ones(B, T, dtype=torch.bool), torch.ones(B, T, dtype=torch.bool),
                        r(B, C, d), r(B, C, d), torch.randint(0, 2, (B, C), generator=g).float(),
                        torch.ones(B, C, dtype=torch.bool))


@pytest.mark.parametrize("name", ["btl", "dpl", "np-btl", "np-btl-latent"])
def test_models_train_step_and_predict(name):
    torch.manual_seed(0)
    m = PreferenceModel(config_from_dict({"model": name, "d_in": 2, "d_hidden": 16, **(
        {"encoder": {"d_z": 4}} if name.startswith("np") else {})}))
    f = features()
    loss, metrics = m.loss(f)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    p = m.predict(f)
    assert p.shape == (3, 5) and ((p >= 0) & (p <= 1)).all()
    if name == "np-btl-latent":
        assert {"nll", "kl"} <= set(metrics)


def test_latent_elbo_uses_target_posterior_and_kl_to_context_posterior():
    """With beta = 0 the loss must not depend on q(z|C) at all: the likelihood samples q(z|T)."""
    torch.manual_seed(0)
    cfg = config_from_dict({"model": "np-btl-latent", "d_in": 2, "d_hidden": 16, "kl_beta": 0.0,
                            "encoder": {"d_z": 4}})
    m = PreferenceModel(cfg)
    f = features()
    g1 = torch.Generator().manual_seed(1)
    l1, _ = m.loss(f, g1)
    f2 = features()
    f2.context_a = f2.context_a + 5.0  # a different context changes q(z|C) only
    l2, _ = m.loss(f2, torch.Generator().manual_seed(1))
    torch.testing.assert_close(l1, l2)
    # with beta > 0 the KL(q(z|T) || q(z|C)) term is exactly the difference
    m.cfg.kl_beta = 1.0
    l3, met = m.loss(f, torch.Generator().manual_seed(1))
    q_t = m.encoder(f.target_a, f.target_b, f.target_choice, f.target_mask)
    q_c = m.posterior(f)
    kl = gaussian_kl(q_t.mean, q_t.std, q_c.mean, q_c.std)
    torch.testing.assert_close(l3 - l1, (kl / f.target_mask.sum(1)).mean(), rtol=1e-5, atol=1e-6)


def test_bad_model_configs():
    with pytest.raises(ValueError, match="unknown reward model"):
        RewardConfig(model="vpl", d_in=2)
    with pytest.raises(ValueError, match="has no context encoder"):
        config_from_dict({"model": "btl", "d_in": 2, "encoder": {"d_z": 3}})
    with pytest.raises(ValueError, match="unknown model option"):
        config_from_dict({"model": "btl", "d_in": 2, "hidden": 3})
    with pytest.raises(ValueError, match="needs a latent z"):
        PreferenceModel(config_from_dict({"model": "np-btl", "d_in": 2})).reward(torch.zeros(1, 2, 2))
