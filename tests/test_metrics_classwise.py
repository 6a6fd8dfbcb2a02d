"""Class-conditional manifold metrics / FID and tail indicators on constructed cases with known answers."""

import math

import pytest
import torch

from tailgen.metrics.classwise import ClassConditionalMetrics
from tailgen.metrics.tail import TailIndicators


def _blobs(per_class, centres, seed, collapse=None):
    g = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for c, centre in enumerate(centres):
        x = centre + torch.randn(per_class, centre.shape[0], generator=g)
        if c == collapse:  # every sample near one point
            x = centre + 0.01 * torch.randn(per_class, centre.shape[0], generator=g)
        feats.append(x)
        labels.append(torch.full((per_class,), c))
    return torch.cat(feats), torch.cat(labels)


CENTRES = [torch.full((6,), 10.0 * c) for c in range(3)]


def test_collapsed_class_has_low_recall_and_coverage():
    real, real_y = _blobs(150, CENTRES, seed=0)
    fake, fake_y = _blobs(150, CENTRES, seed=1, collapse=2)
    m = ClassConditionalMetrics(3)
    m.set_reference(real, real_y)
    m.update(fake[:200], fake_y[:200])
    m.update(fake[200:], fake_y[200:])
    out = m.compute()
    for c in (0, 1):
        assert out[f"class/{c}/recall"] > 0.8 and out[f"class/{c}/coverage"] > 0.9
        assert out[f"class/{c}/fid"] < 0.5
    assert out["class/2/recall"] < 0.05 and out["class/2/coverage"] < 0.1  # (observed 0.0 / 0.06)
    assert out["class/2/precision"] > 0.9  # the collapsed samples still look real
    assert out["class/2/fid"] > 4.0  # covariance ~0 vs identity: FID ~ d = 6
    expected = sum(out[f"class/{c}/recall"] for c in range(3)) / 3
    assert out["classwise/recall_mean"] == pytest.approx(expected)
    assert out["classwise/num_classes"] == 3.0


def test_classes_with_too_few_samples_are_skipped_and_merge():
    real, real_y = _blobs(40, CENTRES, seed=2)
    fake, fake_y = _blobs(40, CENTRES, seed=3)
    keep = (fake_y != 1) | (torch.arange(len(fake_y)) % 10 == 0)  # class 1: 4 samples < k_dc + 1
    fake, fake_y = fake[keep], fake_y[keep]
    one = ClassConditionalMetrics(4, fid=False)  # class 3 absent entirely
    one.update(real, real_y, real=True)
    one.update(fake, fake_y)
    out = one.compute()
    assert out["classwise/num_classes"] == 2.0 and "class/1/recall" not in out and "class/3/recall" not in out
    a, b = ClassConditionalMetrics(4, fid=False), ClassConditionalMetrics(4, fid=False)
    a.update(real[:50], real_y[:50], real=True)
    b.update(real[50:], real_y[50:], real=True)
    a.update(fake[:31], fake_y[:31])
    b.update(fake[31:], fake_y[31:])
    a.merge_state(b)
    assert a.compute() == out


def test_no_evaluable_class_gives_nan_means():
    m = ClassConditionalMetrics(2, fid=False)
    m.set_reference(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    m.update(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    out = m.compute()
    assert out["classwise/num_classes"] == 0.0 and math.isnan(out["classwise/recall_mean"])


def _logits_for(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64))


def test_tail_indicators_constructed_case():
    # class 0: confident & correct; class 1: wrong (predicts 2); class 2: correct but low confidence (0.4)
    logits = torch.cat([
        _logits_for([[0.9, 0.05, 0.05]] * 4),
        _logits_for([[0.1, 0.2, 0.7]] * 2),
        _logits_for([[0.3, 0.3, 0.4]] * 4),
    ])
    labels = torch.tensor([0] * 4 + [1] * 2 + [2] * 4)
    m = TailIndicators(num_classes=3, threshold=0.5)
    m.update(logits[:5], labels[:5])
    m.update(logits[5:], labels[5:])
    out = m.compute()
    assert out["class/0/accuracy"] == 1.0 and out["class/1/accuracy"] == 0.0 and out["class/2/accuracy"] == 1.0
    assert out["class/0/confidence"] == pytest.approx(0.9)
    assert out["class/1/confidence"] == pytest.approx(0.2)
    assert out["class/2/low_conf_share"] == 1.0 and out["class/0/low_conf_share"] == 0.0
    assert out["tail/accuracy"] == pytest.approx(8 / 10)
    assert out["tail/confidence"] == pytest.approx((4 * 0.9 + 2 * 0.2 + 4 * 0.4) / 10)
    assert out["tail/low_conf_share"] == pytest.approx(6 / 10)
    assert out["tail/accuracy_class_min"] == 0.0
    h0 = -(0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05))
    assert out["class/0/entropy"] == pytest.approx(h0)
    # merging two halves (= DDP sum) equals one pass
    a, b = TailIndicators(3), TailIndicators(3)
    a.update(logits[:3], labels[:3])
    b.update(logits[3:], labels[3:])
    a.merge_state(b)
    assert a.compute() == pytest.approx(out)
