"""ClassifierFeatures: the three feature paths, input conversion, identity; to_uint8_nchw."""

import numpy as np
import pytest
import torch
from torch import nn

from tailgen.metrics.features import ClassifierFeatures, to_uint8_nchw
from tailgen.utils import ConfigError, DataError


class PlainNet(nn.Module):
    """No forward_features: penultimate = input of the last Linear (found by hook)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh())
        self.fc = nn.Linear(8, 3)
        self.seen_t = None

    def forward(self, x, t):
        self.seen_t = t
        return self.fc(self.body(x))


def _images(n=5):
    return torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_hook_path_and_input_range():
    torch.manual_seed(0)
    net = PlainNet()
    ext = ClassifierFeatures(net, timestep=7, batch_size=2)
    x = _images()
    out = ext(x)
    xf = x.float() / 127.5 - 1
    torch.testing.assert_close(out["pool"], net.body(xf))
    torch.testing.assert_close(out["logits"], net.fc(net.body(xf)))
    assert net.seen_t.tolist() == [7]  # last chunk of batch_size 2 holds one sample
    named = ClassifierFeatures(net, layer="body.2")  # hook on the input of Tanh = pre-activation
    torch.testing.assert_close(named(x)["pool"], net.body[1](net.body[0](xf)))
    with pytest.raises(ConfigError, match="not found"):
        ClassifierFeatures(net, layer="nope")


def test_forward_features_path_and_identity():
    class FF(PlainNet):
        def forward_features(self, x, t):
            return self.body(x)

    torch.manual_seed(0)
    a = ClassifierFeatures(FF())
    torch.manual_seed(1)
    b = ClassifierFeatures(FF())
    out = a(_images())
    assert out["pool"].shape == (5, 8) and out["logits"].shape == (5, 3)
    assert a.identity != b.identity  # other weights -> other cache key
    assert a.identity == ClassifierFeatures(a.net).identity


def test_adm_encoder_unet_classifier():
    from tailgen.models.adm import create_classifier

    torch.manual_seed(0)
    net = create_classifier(image_size=32, in_channels=1, num_classes=10, classifier_width=32, classifier_depth=1,
                            classifier_attention_resolutions="16", classifier_channel_mult="1,2")
    ext = ClassifierFeatures(net, timestep=0, resize_to=32)
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    out = ext(x)
    xf = nn.functional.interpolate(x.float() / 127.5 - 1, size=32, mode="bilinear", align_corners=False)
    t = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(out["logits"], net(xf, t))
    torch.testing.assert_close(out["pool"], net.forward_features(xf, t))
    assert not any(p.requires_grad for p in ext.parameters()) and not ext.training
    ext.train()
    assert not ext.training  # extractors stay in eval mode


def test_to_uint8_nchw():
    nhwc = np.zeros((2, 5, 6, 3), dtype=np.uint8)
    assert to_uint8_nchw(nhwc, "NHWC").shape == (2, 3, 5, 6)
    assert to_uint8_nchw(np.zeros((2, 5, 6), dtype=np.uint8)).shape == (2, 1, 5, 6)
    with pytest.raises(DataError, match="uint8"):
        to_uint8_nchw(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ConfigError):
        to_uint8_nchw(nhwc, "HWC")
