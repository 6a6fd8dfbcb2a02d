"""LoRA experts on the frozen clean classifier (models/lora.py): a zero-initialised update computes the backbone's
outputs bit for bit; only A, B train; merging gives a plain network with the backbone's keys and the same outputs
bit for bit, loadable as the backbone's preset."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tailgen.models.lora import LowRankDelta, add_lora, lora_parameters, merge_lora
from tailgen.models.spec import NetworkSpec
from tailgen.utils import ConfigError


@pytest.fixture(scope="module")
def backbone():
    torch.set_num_threads(1)
    return NetworkSpec("fashion_clean_classifier").build()


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 1, 28, 28, generator=g), torch.tensor([0, 0, 0])


def randomise(net: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LowRankDelta):
                m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))


def test_zero_update_is_the_backbone_bit_for_bit(backbone):
    net = copy.deepcopy(backbone)
    names = add_lora(net, rank=4)
    kinds = {type(net.get_submodule(n).base) for n in names}
    assert {nn.Conv2d, nn.Conv1d} <= kinds  # the torso's convs and the attention's 1-D convs
    x, t = inputs()
    assert torch.equal(net(x, t), backbone(x, t))


def test_only_the_low_rank_factors_train(backbone):
    net = copy.deepcopy(backbone)
    add_lora(net, rank=2, alpha=4.0, include=r"middle_block|out")
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert trainable and {id(p) for p in trainable} == {id(p) for p in lora_parameters(net)}
    randomise(net)
    x, t = inputs()
    before = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k}
    opt = torch.optim.SGD(lora_parameters(net), lr=0.1)
    net(x, t).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(net))
    opt.step()
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the backbone did not move
    n_lora = sum(p.numel() for p in lora_parameters(net))
    assert n_lora < 0.1 * sum(p.numel() for p in backbone.parameters())


def test_merged_equals_unmerged_and_loads_as_the_backbone(backbone):
    net = copy.deepcopy(backbone)
    add_lora(net, rank=4)
    randomise(net)
    x, t = inputs()
    unmerged = net(x, t)
    assert not torch.allclose(unmerged, backbone(x, t), atol=1e-3)  # the update does something
    merge_lora(net)
    assert not any(isinstance(m, LowRankDelta) for m in net.modules())
    assert torch.equal(net(x, t), unmerged)
    state = net.state_dict()
    assert list(state) == list(backbone.state_dict())
    plain = NetworkSpec("fashion_clean_classifier", random_init=True).build()
    plain.load_state_dict(state)
    assert torch.equal(plain(x, t), unmerged)


def test_bad_arguments(backbone):
    with pytest.raises(ConfigError, match="no Conv1d / Conv2d / Linear"):
        add_lora(copy.deepcopy(backbone), include="no_such_layer")
    with pytest.raises(ConfigError, match="rank"):
        add_lora(copy.deepcopy(backbone), rank=0)
    with pytest.raises(ConfigError, match="wraps"):
        LowRankDelta(nn.GroupNorm(2, 4), 2, 2.0)
