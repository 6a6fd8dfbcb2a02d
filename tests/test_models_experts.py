"""PPAP classifier experts (models/experts.py): per-sample routing by timestep inside one batch, PPAP's split,
guidance gradients through each sample's own expert, a one-expert set bit-identical to the bare classifier (network
and whole guided sampling run), and the config form ``model.init_args.classifier: [ExpertSpec, ...]``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tailgen.diffusion import DiffusionProcess, NoisyClassifier
from tailgen.guidance import ClassifierEval, ClassifierGuidance
from tailgen.models.experts import ClassifierExperts, check_ranges, ppap_ranges
from tailgen.models.spec import ExpertSpec, NetworkSpec, build_experts
from tailgen.utils import ConfigError

C, SHAPE = 5, (1, 4, 4)


class LinearExpert(nn.Module):
    """logits = W_k x.flatten() + t * v_k; records the timesteps it is called with."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(C, 16, generator=g, dtype=torch.float64), requires_grad=False)
        self.v = nn.Parameter(torch.randn(C, generator=g, dtype=torch.float64) * 1e-3, requires_grad=False)
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        self.seen.append(t.clone())
        return x.flatten(1) @ self.W.T.to(x.dtype) + t[:, None].to(x.dtype) * self.v.to(x.dtype)


def experts3():
    return ClassifierExperts([LinearExpert(k) for k in range(3)], [(0, 99), (100, 499), (500, 999)], [0, None, None])


def test_routing_per_sample_in_a_mixed_batch():
    net = experts3()
    x = torch.randn(6, *SHAPE, dtype=torch.float64)
    t = torch.tensor([999, 0, 100, 99, 500, 499])
    out = net(x, t)
    which = [2, 0, 1, 0, 2, 1]
    for b, k in enumerate(which):
        expert = net.experts[k]
        t_seen = 0 if k == 0 else int(t[b])  # expert 0 has fixed_t = 0
        want = x[b:b + 1].flatten(1) @ expert.W.T + t_seen * expert.v
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-12, atol=1e-12)
    assert net.expert_index(t).tolist() == which
    assert torch.equal(net.experts[0].seen[-1], torch.zeros(2, dtype=torch.int64))  # fixed_t, not 0 and 99
    assert net.experts[1].seen[-1].tolist() == [100, 499]
    # a batch inside one range is one call with the timesteps as given (an int stays an int)
    for e in net.experts:
        e.seen.clear()
    net(x, 300)
    assert [len(e.seen) for e in net.experts] == [0, 1, 0] and net.experts[1].seen[0].tolist() == [300] * 6
    with pytest.raises(ConfigError, match="outside every expert"):
        net(x, torch.tensor([0, 1, 2, 3, 4, 1000]))


def test_guidance_gradient_flows_through_each_samples_expert():
    """grad_x log p(y | x_t) of a mixed batch equals each sample's own expert's closed form W_y - p W."""
    net = experts3()
    process = DiffusionProcess.from_flags(noise_schedule="cosine", timestep_respacing="10")
    i = torch.tensor([9, 0, 3, 6])  # respaced indices -> original t across the three ranges
    t = process.original_t(i)
    assert len(set(net.expert_index(t).tolist())) == 3
    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 4])
    ev = ClassifierEval(NoisyClassifier(net, process), x, i, y)
    g = ev.grad_log_p_y
    for b, k in enumerate(net.expert_index(t).tolist()):
        W = net.experts[k].W.float()
        p = torch.softmax(ev.logits[b].detach(), -1)
        torch.testing.assert_close(g[b].flatten(), W[y[b]] - p @ W)
    assert g.abs().sum() > 0


def test_ppap_split_matches_the_reference_rule():
    """multi_expert_helper.py: first k with int(k T/N) <= t <= int((k+1) T/N)."""
    for n, T in [(5, 1000), (3, 1000), (4, 50), (1, 1000)]:
        ranges = ppap_ranges(n, T)
        bounds = [int(k * T / n) for k in range(n + 1)]
        net = ClassifierExperts([nn.Identity()] * n, ranges)
        reference = [next(k for k in range(n) if bounds[k] <= t <= bounds[k + 1]) for t in range(T)]
        assert net.expert_index(torch.arange(T)).tolist() == reference
    assert ppap_ranges(5, 1000) == [(0, 200), (201, 400), (401, 600), (601, 800), (801, 999)]


@pytest.mark.parametrize("ranges, word", [
    ([(0, 99), (101, 999)], "contiguous"), ([(0, 99), (50, 999)], "contiguous"), ([(1, 999)], "from 0"),
    ([(0, 500)], "cover every timestep"), ([(0, 99, 3)], r"\[lo, hi\]"), ([], "at least one"),
])
def test_bad_ranges(ranges, word):
    with pytest.raises(ConfigError, match=word):
        check_ranges(ranges, 1000)


def test_one_expert_set_is_the_bare_classifier_bit_for_bit():
    single = NetworkSpec("fashion_noisy_classifier").build()
    experts = build_experts([ExpertSpec("fashion_noisy_classifier")], 1000)
    assert experts.t_ranges == [(0, 999)]
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for t in (torch.tensor([999, 10, 500, 0]), 250):
        assert torch.equal(experts(x, t), single(x, t))


def test_guided_sampling_with_a_one_expert_set_is_bit_identical():
    from tailgen.module.guided import GuidedDiffusion

    torch.set_num_threads(1)
    kwargs = dict(guidances={"cg": ClassifierGuidance(scale=2.0)}, diffusion={"timestep_respacing": "4"},
                  progress=False, check_samples=False)
    labels, seeds = torch.tensor([1, 8]), torch.tensor([5, 6])
    a = GuidedDiffusion(NetworkSpec("fashion_diffusion"), classifier=NetworkSpec("fashion_noisy_classifier"), **kwargs)
    b = GuidedDiffusion(NetworkSpec("fashion_diffusion"), classifier=[ExpertSpec("fashion_noisy_classifier")], **kwargs)
    assert isinstance(b.classifier_net, ClassifierExperts)
    assert torch.equal(a.sample(labels, seeds), b.sample(labels, seeds))
    # two experts (the shipped config's form) give other, valid samples
    two = GuidedDiffusion(NetworkSpec("fashion_diffusion"), classifier=[
        ExpertSpec("fashion_clean_classifier", t_range=[0, 99], fixed_t=0),
        ExpertSpec("fashion_noisy_classifier", t_range=[100, 999])], **kwargs)
    c = two.sample(labels, seeds)
    assert torch.isfinite(c).all() and not torch.equal(a.sample(labels, seeds), c)


def test_expert_config_errors():
    from tailgen.module.guided import GuidedDiffusion

    net = NetworkSpec("fashion_diffusion")
    with pytest.raises(ConfigError, match="t_range on every expert or on none"):
        GuidedDiffusion(net, classifier=[ExpertSpec("fashion_noisy_classifier", t_range=[0, 99]),
                                         ExpertSpec("fashion_noisy_classifier")], progress=False)
    with pytest.raises(ConfigError, match="cover every timestep"):
        GuidedDiffusion(net, classifier=[ExpertSpec("fashion_noisy_classifier", t_range=[0, 99]),
                                         ExpertSpec("fashion_noisy_classifier", t_range=[100, 998])], progress=False)
    with pytest.raises(ConfigError, match=r"model.init_args.classifier.1: .* has no weights"):
        GuidedDiffusion(net, classifier=[ExpertSpec("fashion_noisy_classifier"),
                                         ExpertSpec(flags=dict(image_size=28, num_classes=10))], progress=False)
    for bad in ({"t_range": [5, 1]}, {"fixed_t": -1}, {"fixed_t": True}):
        with pytest.raises(ConfigError, match="expert's"):
            ExpertSpec("fashion_noisy_classifier", **bad)
