"""The 'above the reference curve' rule of the tail study (tailgen.metrics.frontier, PROTOCOL.md)."""

import math

import pytest

from tailgen.metrics.frontier import curve_value, margin_over_curve


def test_linear_interpolation_on_a_monotone_curve():
    # accuracy rises, recall falls with the guidance scale
    acc, rec = [0.88, 0.95, 0.99], [0.90, 0.85, 0.75]
    assert curve_value(acc, rec, 0.88) == pytest.approx(0.90)
    assert curve_value(acc, rec, 0.915) == pytest.approx(0.875)
    assert curve_value(acc, rec, 0.97) == pytest.approx(0.80)
    assert curve_value(acc, rec, 0.99) == pytest.approx(0.75)


def test_outside_the_curve_is_not_comparable():
    assert curve_value([0.88, 0.99], [0.9, 0.7], 0.87) is None
    assert curve_value([0.88, 0.99], [0.9, 0.7], 0.995) is None
    assert curve_value([0.88, 0.99], [0.9, 0.7], math.nan) is None
    assert curve_value([1.0], [0.5], 1.0) == 0.5 and curve_value([1.0], [0.5], 1.1) is None


def test_u_shaped_fidelity_takes_the_larger_branch():
    # FID falls then rises with the scale; recall falls all along: FID 3 is reached on both branches
    fid, rec = [4.0, 2.0, 6.0], [0.9, 0.8, 0.6]
    # first branch: 4 -> 2 at FID 3 gives 0.85; second: 2 -> 6 at FID 3 gives 0.75; the conservative max
    assert curve_value(fid, rec, 3.0) == pytest.approx(0.85)
    assert curve_value(fid, rec, 5.0) == pytest.approx(0.65)  # only the second branch reaches FID 5


def test_flat_segment_takes_the_larger_end():
    assert curve_value([1.0, 1.0, 2.0], [0.3, 0.5, 0.1], 1.0) == pytest.approx(0.5)


def test_margin_and_verdict():
    curve = [{"acc": 0.88, "recall": 0.90, "coverage": 0.93}, {"acc": 0.99, "recall": 0.70, "coverage": 0.83}]
    sigma = {"recall": 0.01, "coverage": 0.01}
    above = margin_over_curve(curve, {"acc": 0.935, "recall": 0.83, "coverage": 0.91}, "acc",
                              ["recall", "coverage"], sigma)
    assert above["comparable"] and above["above"]
    assert above["reference"]["recall"] == pytest.approx(0.80)
    assert above["z"]["recall"] == pytest.approx(3.0) and above["z"]["coverage"] == pytest.approx(3.0)
    # one metric within 2 sigma: not above
    tie = margin_over_curve(curve, {"acc": 0.935, "recall": 0.83, "coverage": 0.895}, "acc", ["recall", "coverage"], sigma)
    assert tie["comparable"] and not tie["above"] and tie["z"]["coverage"] == pytest.approx(1.5)
    # a point on the curve itself is not above it
    on = margin_over_curve(curve, curve[0], "acc", ["recall", "coverage"], sigma)
    assert on["comparable"] and not on["above"] and on["margin"]["recall"] == pytest.approx(0.0)
    out = margin_over_curve(curve, {"acc": 0.80, "recall": 1.0, "coverage": 1.0}, "acc", ["recall"], sigma)
    assert not out["comparable"] and not out["above"]


def test_bad_curve_is_rejected():
    with pytest.raises(ValueError):
        curve_value([1.0, 2.0], [0.5], 1.5)
