"""`MetricSuite`: the metric collection a LightningModule holds (feature extraction once per batch).

Usage (test loop)::

    suite = MetricSuite(["fid", "sfid", "is", "precision", "recall", "classwise", "tail"], InceptionFeatures(),
                        reference, clean_classifier=ClassifierFeatures(clean_net), num_classes=1000)
    suite.update(images_uint8_nchw, labels)        # every rank, every batch
    values = suite.compute()                       # every rank (collective under DDP); same dict everywhere
    suite.reset()

Output names: ``fid, sfid, is, precision, recall, density, coverage, kid, kid_std``; ``classwise/<m>_mean``,
``classwise/num_classes``, ``class/<c>/<m>`` (class-wise P/R/D/C/FID and tail indicators);
``tail/accuracy, tail/confidence, tail/low_conf_share, tail/entropy, tail/accuracy_class_min``.

DDP: every metric is a torchmetrics `Metric` (sum states for FID statistics and tail counts, ``cat`` states for
features/logits/labels, gathered with uneven per-rank sizes); `compute` syncs, so call it on all ranks and log
the result without ``sync_dist``. Reference data is not state: pass the same `Reference` on every rank.
A rank without samples is fine (`GatherSafeMetric`). After the gather every rank runs the k-NN / Fréchet
computation itself (same numbers, redundant work).

The extractors are deliberately *not* sub-modules: their weights (95 MB for Inception) stay out of the
LightningModule's checkpoint, and they follow the images' device on the first `update`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tailgen.metrics.classwise import ClassConditionalMetrics
from tailgen.metrics.features import FeatureExtractor, to_uint8_nchw
from tailgen.metrics.fid import FrechetDistance, KernelDistance, gaussian_stats
from tailgen.metrics.inception_score import InceptionScore
from tailgen.metrics.manifold import PrecisionRecallDensityCoverage
from tailgen.metrics.reference import DEFAULT_CACHE_DIR, Reference, build_reference
from tailgen.metrics.tail import TailIndicators
from tailgen.metrics.tail_manifold import TAIL_MANIFOLD_KEYS, TailManifold
from tailgen.utils import ConfigError, DataError

__all__ = ["MetricSuite", "MultiSpaceSuite", "METRIC_NAMES"]

METRIC_NAMES = ("fid", "sfid", "is", "precision", "recall", "density", "coverage", "kid", "classwise", "tail",
                "rarity", "tail_coverage")
_MANIFOLD = ("precision", "recall", "density", "coverage")


class MetricSuite(nn.Module):
    """Metrics named in ``metrics`` over one feature extractor and a real `Reference`.

    Args:
        metrics: names among `METRIC_NAMES`.
        extractor: provides ``pool`` (fid, kid, P/R/D/C, classwise), ``spatial`` (sfid), ``logits`` (is).
        reference: real features (+ labels for classwise, + optional precomputed stats). None: feed real
            images with `update_real` (then pass ``feature_dims`` for fid/sfid).
        clean_classifier: the clean-image classifier whose ``logits`` on the samples judge ``tail`` (sample accuracy,
            confidence); default: ``extractor``.
        num_classes: required for ``classwise`` and ``tail``.
        use_npz_stats: use the reference's precomputed (mu, sigma) (ADM's TF statistics) for fid/sfid even when
            reference features exist (without features they are used anyway).
        compute_on_cpu: keep ``cat`` states on the host (torchmetrics option; saves accelerator memory).
        tail_fraction: share of the least-dense reals forming the tail of ``tail_coverage``.

    ``rarity`` (k = ``k_pr``) and ``tail_coverage`` (k = ``k_dc``) are `TailManifold`; with ``classwise`` they
    are computed within each class too (``class/<c>/rarity``, ``classwise/tail_coverage_mean``...).
    """

    def __init__(self, metrics: Sequence[str], extractor: FeatureExtractor, reference: Reference | None = None, *,
                 clean_classifier: FeatureExtractor | None = None, num_classes: int | None = None, k_pr: int = 3,
                 k_dc: int = 5, inclusive: bool = True, block_size: int = 4096, fid_method: str = "eigh",
                 is_splits: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 low_conf_threshold: float = 0.5, per_class: bool = True, use_npz_stats: bool = False,
                 feature_dims: dict[str, int] | None = None, compute_on_cpu: bool = False,
                 tail_fraction: float = 0.2):
        super().__init__()
        names = [m.lower() for m in metrics]
        unknown = sorted(set(names) - set(METRIC_NAMES))
        if unknown or not names:
            raise ConfigError(f"unknown metric names {unknown}; choose from {', '.join(METRIC_NAMES)}")
        self.names = tuple(dict.fromkeys(names))
        object.__setattr__(self, "extractor", extractor)  # not a sub-module (see module docstring)
        object.__setattr__(self, "clean_classifier", clean_classifier)
        self._check_provides(num_classes)
        ref = reference if reference is not None else Reference({})  # (a stats-only Reference has len 0)
        dims = {k: v.shape[1] for k, v in ref.features.items()}
        dims.update({k: s[0].shape[0] for k, s in ref.stats.items()})
        dims.update(feature_dims or {})
        cpu = {"compute_on_cpu": compute_on_cpu}
        m: dict[str, nn.Module] = {}
        self._stats_dims: dict[str, int] = {}  # fid/sfid whose reference is precomputed statistics: their dimension
        for name, key in (("fid", "pool"), ("sfid", "spatial")):
            if name not in self.names:
                continue
            if key not in dims:
                raise ConfigError(f"{name}: feature dimension unknown; give a reference with '{key}' features or "
                                  f"statistics, or feature_dims={{'{key}': D}}")
            m[name] = FrechetDistance(dims[key], method=fid_method)
            if key in ref.stats and (use_npz_stats or key not in ref.features):
                stats_dim = ref.stats[key][0].shape[0]
                if key in ref.features and ref.features[key].shape[1] != stats_dim:
                    raise ConfigError(_dims_message(name, key, ref.features[key].shape[1], stats_dim))
                self._stats_dims[key] = stats_dim
                m[name].set_reference(*ref.stats[key])
            elif key in ref.features:
                m[name].set_reference(*gaussian_stats(ref.features[key]))
        if "is" in self.names:
            m["is"] = InceptionScore(splits=is_splits, **cpu)
        if any(n in self.names for n in _MANIFOLD):
            m["prdc"] = PrecisionRecallDensityCoverage(k_pr, k_dc, inclusive=inclusive, block_size=block_size, **cpu)
            if "pool" in ref.features:
                m["prdc"].set_reference_features(ref.features["pool"])
        if "kid" in self.names:
            m["kid"] = KernelDistance(subsets=kid_subsets, subset_size=kid_subset_size, **cpu)
            if "pool" in ref.features:
                m["kid"].set_reference_features(ref.features["pool"])
        tail_manifold = [n for n in TAIL_MANIFOLD_KEYS if n in self.names]
        if tail_manifold:
            m["tail_manifold"] = TailManifold(k_pr, k_dc, tail_fraction, inclusive=inclusive, block_size=block_size,
                                              **cpu)
            if "pool" in ref.features:
                m["tail_manifold"].set_reference_features(ref.features["pool"])
        if "classwise" in self.names:
            m["classwise"] = ClassConditionalMetrics(num_classes, k_pr=k_pr, k_dc=k_dc, per_class=per_class,
                                                     inclusive=inclusive, block_size=block_size,
                                                     tail=tail_manifold, tail_fraction=tail_fraction, **cpu)
            if "pool" in ref.features and ref.labels is not None:
                m["classwise"].set_reference(ref.features["pool"], ref.labels)
        if "tail" in self.names:
            m["tail"] = TailIndicators(num_classes, low_conf_threshold, per_class=per_class)
        self.metrics = nn.ModuleDict(m)

    @classmethod
    def with_reference(cls, metrics: Sequence[str], extractor: FeatureExtractor, *, images=None, labels=None,
                       npz=None, folder=None, cache_dir=DEFAULT_CACHE_DIR, sample_shape=None, **kwargs) -> "MetricSuite":
        """Build the `Reference` (cached on disk, `build_reference`) and the suite in one call."""
        ref = build_reference(extractor, images=images, labels=labels, npz=npz, folder=folder, cache_dir=cache_dir,
                              sample_shape=sample_shape)
        return cls(metrics, extractor, ref, **kwargs)

    def _check_provides(self, num_classes) -> None:
        need = {"fid": "pool", "sfid": "spatial", "is": "logits", "kid": "pool", "classwise": "pool",
                **{n: "pool" for n in (*_MANIFOLD, *TAIL_MANIFOLD_KEYS)}}
        provides = set(self.extractor.provides)
        for name in self.names:
            if name in need and need[name] not in provides:
                raise ConfigError(f"metric {name!r} needs '{need[name]}' features; "
                                  f"{type(self.extractor).__name__} provides {sorted(provides)}")
        if "tail" in self.names and "logits" not in (self.clean_classifier or self.extractor).provides:
            raise ConfigError("metric 'tail' needs a classifier with logits "
                              "(clean_classifier=ClassifierFeatures(net))")
        if ("classwise" in self.names or "tail" in self.names) and not num_classes:
            raise ConfigError("'classwise' and 'tail' need num_classes")

    def _features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = to_uint8_nchw(images)
        for ext in (self.extractor, self.clean_classifier):
            if ext is not None and ext.device != images.device:
                ext.to(images.device)
        return self.extractor(images)

    def update(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Generated images (uint8 NCHW) and their requested labels (needed for classwise / tail)."""
        feats = self._features(images)
        for key, dim in self._stats_dims.items():
            if key in feats and feats[key].shape[1] != dim:
                raise ConfigError(_dims_message("fid" if key == "pool" else "sfid", key, feats[key].shape[1], dim))
        if labels is None and ("classwise" in self.metrics or "tail" in self.metrics):
            raise DataError("classwise / tail metrics need the requested labels in update(images, labels)")
        for name, metric in self.metrics.items():
            if name == "fid":
                metric.update(feats["pool"])
            elif name == "sfid":
                metric.update(feats["spatial"])
            elif name == "is":
                metric.update(feats["logits"])
            elif name in ("prdc", "kid", "tail_manifold"):
                metric.update(feats["pool"])
            elif name == "classwise":
                metric.update(feats["pool"], labels)
            elif name == "tail":
                domain = feats if self.clean_classifier is None else self.clean_classifier(to_uint8_nchw(images))
                metric.update(domain["logits"], labels)

    def update_real(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Real images fed in the loop (synchronised states) instead of, or overriding, the fixed reference."""
        feats = self._features(images)
        for name, metric in self.metrics.items():
            if name in ("fid", "sfid"):
                metric.update(feats["pool" if name == "fid" else "spatial"], real=True)
            elif name in ("prdc", "kid", "tail_manifold"):
                metric.update(feats["pool"], real=True)
            elif name == "classwise" and labels is not None:
                metric.update(feats["pool"], labels, real=True)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            if name == "prdc":
                out.update({k: v for k, v in value.items() if k in self.names})
            elif name == "tail_manifold":
                keep = {key for n in self.names for key in TAIL_MANIFOLD_KEYS.get(n, ())}
                out.update({k: v for k, v in value.items() if k in keep})
            elif name == "kid":
                out["kid"], out["kid_std"] = float(value[0]), float(value[1])
            elif isinstance(value, dict):
                out.update(value)
            else:
                out[name] = float(value)
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


class MultiSpaceSuite(nn.Module):
    """The same metrics in several feature spaces from one pass over the samples: ``suites[name]`` is a
    `MetricSuite` (its own extractor and reference). ``compute()`` merges their results, prefixing the keys of
    every space but the unnamed one (``""``, the domain space, whose keys stay as `MetricSuite` names them):
    ``fid, recall, ...`` and ``judge/fid, judge/recall, judge/class/<c>/coverage, ...``."""

    def __init__(self, suites: dict[str, MetricSuite]):
        super().__init__()
        if not suites:
            raise ConfigError("MultiSpaceSuite needs at least one MetricSuite")
        bad = [name for name in suites if "/" in name or name != name.strip()]
        if bad:
            raise ConfigError(f"feature-space names must not contain '/' or spaces: {bad}")
        self.order = list(suites)
        self.suites = nn.ModuleDict({(name or "_domain"): suite for name, suite in suites.items()})

    def _items(self):
        return [(name, self.suites[name or "_domain"]) for name in self.order]

    def update(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        images = to_uint8_nchw(images)
        for _, suite in self._items():
            suite.update(images, labels)

    def update_real(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        for _, suite in self._items():
            suite.update_real(images, labels)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, suite in self._items():
            out.update({(f"{name}/{k}" if name else k): v for k, v in suite.compute().items()})
        return out

    def reset(self) -> None:
        for _, suite in self._items():
            suite.reset()

def _dims_message(name: str, key: str, feature_dim: int, stats_dim: int) -> str:
    return (f"{name}: the features are {feature_dim}-d ({key}) but the reference's precomputed statistics "
            f"(mu/sigma of evaluation.reference) are {stats_dim}-d: guided-diffusion's statistics fit Inception "
            "features only; use evaluation.features=inception, or a reference with images (arr_0)")
