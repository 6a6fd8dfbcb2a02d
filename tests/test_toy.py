import torch

from tailgen.data import toy
from tailgen.models.toy import ToyClassifier, ToyDenoiser


def test_true_sampler_shares():
    g = torch.Generator().manual_seed(0)
    x, y, modes = toy.sample(60000, generator=g)
    assert x.shape == (60000, 2) and x.dtype == torch.float32
    assert 0.8 < x.std().item() < 1.2  # model units: data std ~ 1
    s = toy.mode_shares(x, y)
    e = toy.expected_shares()
    # binomial std per class (20k points): rareA ~0.0018, rareB ~0.0012, off ~0.0004 pooled
    assert abs(s["rareA"] - e["rareA"]) < 0.006
    assert abs(s["rareB"] - e["rareB"]) < 0.004
    assert abs(s["dominant"] - e["dominant"]) < 0.008
    assert abs(s["off"] - e["off"]) < 0.002
    assert s["wrong_class"] == 0.0


def test_assignment_recovers_generating_mode():
    g = torch.Generator().manual_seed(1)
    x, y, modes = toy.sample(20000, generator=g)
    a = toy.assign_modes(x, y)
    on = a != toy.OFF
    assert (a[on] == modes[on]).all()  # modes are separated: inside 3 sigma means the right mode
    assert (toy.MODE_CLASS[modes] == y).all()


def test_assignment_by_hand():
    c = toy.CENTRES_WORLD / toy.SCALE
    pts = torch.cat([c, torch.tensor([[0.0, 0.0], [5.0, 5.0]], dtype=torch.float64)]).float()
    a = toy.assign_modes(pts)
    assert a.tolist() == list(range(9)) + [toy.OFF, toy.OFF]
    # a class-0 sample sitting in class 1's dominant mode is wrong-class
    s = toy.mode_shares(c[3:4].float(), torch.tensor([0]))
    assert s["wrong_class"] == 1.0 and s["dominant"] == 0.0


def test_geometry_matches_study():
    c = toy.CENTRES_WORLD
    # rare B of class 0 is ~3.2 from D of class 1 and ~4.1 from D of class 0
    assert abs((c[2] - c[3]).norm().item() - 3.24) < 0.05
    assert abs((c[2] - c[0]).norm().item() - 4.08) < 0.05
    assert abs((c[1] - c[0]).norm().item() - 3.6) < 0.05


def test_toy_networks_signatures():
    net, clf = ToyDenoiser(), ToyClassifier()
    x = torch.randn(5, 2)
    t = torch.tensor([0, 10, 500, 999, 3])
    assert net(x, t, torch.tensor([0, 1, 2, 0, 3])).shape == (5, 2)
    assert net(x, 7).shape == (5, 2) and net(x, t, None).shape == (5, 2)
    assert ToyDenoiser(learn_sigma=True)(x, t, torch.zeros(5, dtype=torch.long)).shape == (5, 4)
    assert clf(x, t).shape == (5, 3) and clf.forward_features(x, t).shape == (5, 128)
    assert net.label_emb.num_embeddings == 4


def test_scatter_png(tmp_path):
    x, y, _ = toy.sample(500, generator=torch.Generator().manual_seed(0))
    toy.scatter_png(tmp_path / "s.png", x, y, title="truth")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_preconditioned_denoiser_is_gaussian_optimal_at_init():
    from tailgen.models.toy import discrete_alphas_cumprod

    net = ToyDenoiser(precondition=True)  # zero-initialised head: eps = c_skip x = E[eps | x_t] for N(0, I) data
    abar = discrete_alphas_cumprod("cosine", 1000)
    x = torch.randn(4, 2)
    for t in (0, 500, 999):
        expect = x * (1 - abar[t]) ** 0.5 / (abar[t] + 1 - abar[t])
        torch.testing.assert_close(net(x, t, None), expect.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(net(x, 999, None), x, atol=1e-4, rtol=1e-4)  # pure noise: eps = x_t


def test_toy_schedule_matches_process():
    import numpy as np

    from tailgen.diffusion.process import DiffusionProcess
    from tailgen.models.toy import discrete_alphas_cumprod

    for name in ("cosine", "linear"):
        np.testing.assert_allclose(discrete_alphas_cumprod(name, 1000),
                                   DiffusionProcess.from_flags(noise_schedule=name).alphas_cumprod, rtol=1e-12)
