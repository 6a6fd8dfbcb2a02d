"""What ``tailgen test`` measures: a typed, YAML-buildable description of the metric suite, its feature
extractor and its real reference data, plus the report (table on stdout, ``metrics.json``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from tailgen.metrics.features import ClassifierFeatures
from tailgen.metrics.reference import DEFAULT_CACHE_DIR
from tailgen.metrics.suite import MetricSuite, MultiSpaceSuite
from tailgen.models.spec import NetworkSpec
from tailgen.utils import ConfigError
from tailgen.utils.images import class_grid, make_grid
from tailgen.utils.io import atomic_write

FEATURE_NETWORK_KEY = "model.init_args.evaluation.feature_network"  # as the configs write it
LABELLED_METRICS = ("classwise", "tail")  # need the samples' requested labels
DEFAULT_METRICS = ("fid", "precision", "recall", "density", "coverage", "classwise", "tail")
HEADLINE = ("fid", "sfid", "is", "precision", "recall", "density", "coverage", "kid",
            "rarity", "rarity_outside", "tail_coverage", "head_coverage",
            "classwise/recall_mean", "classwise/coverage_mean", "classwise/fid_mean",
            "classwise/rarity_mean", "classwise/tail_coverage_mean",
            "tail/accuracy", "tail/confidence", "tail/low_conf_share")


class Evaluation:
    """Metric configuration of ``tailgen test``.

    Args:
        metrics: among fid, sfid, is, precision, recall, density, coverage, kid, classwise, tail, rarity,
            tail_coverage.
        features: ``classifier`` (penultimate features of ``feature_network``: the domain features used for
            Fashion-MNIST) or ``inception`` (torch-fidelity's FID Inception; ImageNet).
        feature_network: the clean classifier for ``classifier`` features; also judges class accuracy /
            confidence of samples for ``tail`` (with ``inception`` features it is required for ``tail``).
        reference: real data: ``fashion_mnist:test`` / ``fashion_mnist:train``, a guided-diffusion reference batch
            ``.npz`` (images and/or mu/sigma), or an image folder.
        max_reference: use only the first N reference images (None: all).
        inception_weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (default: torch hub cache).
        cache_dir: where reference features are cached (keyed by content hash and extractor).
        output: where the metrics JSON is written; a relative path goes under the run's own folder (the logger's
            version folder, ``<W&B save_dir>/<run name>/<run id>``, or ``default_root_dir/version_N``: see
            ``module/run_folder.py``), so runs never overwrite each other's; config.yaml and grid.png go beside it.
        keep_samples: ``tailgen test`` also writes the sampled images beside the metrics (samples.npz +
            samples.json, as ``tailgen predict``); ignored when evaluating ``data.samples``.
        low_conf_threshold: a sample is "low confidence" when the clean classifier's p(y|x) is below this.
        spaces: more feature spaces, ``{name: classifier network}``: every metric is computed again in each
            network's penultimate features (``tail`` with its own logits), from the same samples, against the same
            reference images (features cached per network); keys are prefixed ``<name>/`` (``judge/fid``...),
            the ``features`` space keeps unprefixed keys.
        tail_fraction: share of the least-dense reals forming the tail of ``tail_coverage``.
    """

    def __init__(self, metrics: Sequence[str] = DEFAULT_METRICS, features: Literal["classifier", "inception"] = "classifier",
                 feature_network: Optional[NetworkSpec] = None, reference: str = "fashion_mnist:test",
                 max_reference: Optional[int] = None, inception_weights: Optional[str] = None,
                 cache_dir: Optional[str] = str(DEFAULT_CACHE_DIR), output: str = "metrics.json",
                 low_conf_threshold: float = 0.5, spaces: Optional[dict[str, NetworkSpec]] = None,
                 tail_fraction: float = 0.2, keep_samples: bool = False):
        if features == "classifier" and feature_network is None:
            raise ConfigError("evaluation.features=classifier needs evaluation.feature_network (a clean classifier)")
        self.metrics, self.features, self.feature_network = list(metrics), features, feature_network
        self.reference, self.max_reference, self.inception_weights = reference, max_reference, inception_weights
        self.cache_dir, self.output, self.low_conf_threshold = cache_dir, output, low_conf_threshold
        self.spaces, self.tail_fraction, self.keep_samples = dict(spaces or {}), tail_fraction, keep_samples
        bad = [name for name in self.spaces if not name or "/" in name]
        if bad:
            raise ConfigError(f"evaluation.spaces names must be non-empty and without '/': {bad}")

    def reference_source(self) -> dict:
        """``build_reference`` keyword for the configured reference data."""
        if self.reference.startswith("fashion_mnist"):
            from tailgen.data.fashion_mnist import load_fashion_mnist

            split = self.reference.partition(":")[2] or "test"
            images, labels = load_fashion_mnist(split)
            n = self.max_reference or len(images)
            return {"images": images[:n, None], "labels": labels[:n]}
        path = Path(self.reference).expanduser()
        if path.suffix == ".npz":
            return {"npz": path}
        if path.is_dir():
            return {"folder": path}
        raise ConfigError(f"evaluation.reference {self.reference!r}: use fashion_mnist:test, a reference .npz or a folder")

    def build_suite(self, num_classes: Optional[int], sample_shape: Optional[tuple] = None,
                    metrics: Optional[Sequence[str]] = None) -> MetricSuite | MultiSpaceSuite:
        """The metric suite with its reference features (cached on disk); a `MultiSpaceSuite` with ``spaces``.
        ``sample_shape`` (H, W, C) of the samples: a reference of another size is refused before any feature is
        computed. ``metrics`` overrides the configured list (e.g. without those that need labels). With Inception
        features, a reference batch's precomputed statistics (ADM's ``mu/sigma``, ``mu_s/sigma_s``) give FID /
        sFID's reference side."""
        metrics = list(metrics or self.metrics)
        source = self.reference_source()
        options = dict(num_classes=num_classes, cache_dir=self.cache_dir, low_conf_threshold=self.low_conf_threshold,
                       tail_fraction=self.tail_fraction, sample_shape=sample_shape, **source)
        clean = None
        if self.feature_network is not None:
            clean = ClassifierFeatures(self.feature_network.build(key=FEATURE_NETWORK_KEY), timestep=0,
                                       name=self.feature_network.preset)
        if self.features == "inception":
            from tailgen.metrics.inception import InceptionFeatures

            extractor = InceptionFeatures(self.inception_weights, spatial="sfid" in self.metrics)
        else:
            extractor = clean
        domain = MetricSuite.with_reference(metrics, extractor, clean_classifier=clean,
                                            use_npz_stats=self.features == "inception", **options)
        if not self.spaces:
            return domain
        suites = {"": domain}
        for name, spec in self.spaces.items():
            judge = ClassifierFeatures(spec.build(key=f"model.init_args.evaluation.spaces.{name}"), timestep=0,
                                       name=spec.preset)
            suites[name] = MetricSuite.with_reference(metrics, judge, clean_classifier=judge, **options)
        return MultiSpaceSuite(suites)

    def evaluate(self, images, labels=None, *, num_classes: Optional[int] = None, batch_size: int = 250) -> dict[str, float]:
        """Python API: the configured metrics of uint8 N x H x W x C ``images`` (numpy or tensor, e.g. from
        ``GuidedDiffusion.generate``) and their requested ``labels`` (needed by classwise / tail), without a
        Trainer. ``num_classes`` defaults to the largest label + 1."""
        import torch

        images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ConfigError(f"evaluate() takes uint8 N x H x W x C images, got {images.dtype} {tuple(images.shape)}")
        labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if labels is not None and len(labels) != len(images):
            raise ConfigError(f"evaluate() got {len(images)} images but {len(labels)} labels")
        if num_classes is None and labels is not None:
            num_classes = int(labels.max()) + 1
        suite = self.build_suite(num_classes)
        for k in range(0, len(images), batch_size):
            suite.update(images[k:k + batch_size].permute(0, 3, 1, 2), None if labels is None else labels[k:k + batch_size])
        return as_floats(suite.compute())


def format_table(values: dict[str, float]) -> str:
    """The headline metrics first (each feature space's after the domain ones), then the other pooled and
    class-mean values; per-class entries (``class/<c>/...``) stay in metrics.json."""
    prefixes = [""] + sorted({k.split("/", 1)[0] + "/" for k in values if k.partition("/")[2] in HEADLINE})
    head = [p + h for p in prefixes for h in HEADLINE if p + h in values]
    rows = [(k, values[k]) for k in head]
    rows += [(k, v) for k, v in values.items() if k not in head and not (k.startswith("class/") or "/class/" in k)]
    width = max((len(k) for k, _ in rows), default=10)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in rows)


def write_report(values: dict[str, float], path: Path) -> Path:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(clean, indent=2, sort_keys=True)))


def as_floats(values: dict) -> dict[str, float]:
    return {k: float(np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)) for k, v in values.items()}


class GridSamples:
    """The test run's picture: the first ``per_class`` samples of each class, drawn as one labelled row per class
    (samples without labels: the first 100, ``per_class`` to a row, no class names)."""

    def __init__(self, class_names=None, per_class: int = 10):
        self.class_names, self.per_class = class_names, per_class
        self.images: list = []
        self.labels: list[int] = []
        self.counts: dict[int, int] = {}

    def add(self, images, labels) -> None:
        limit = self.per_class if (labels >= 0).all() else 100
        for image, label in zip(images, labels):
            if self.counts.get(int(label), 0) < limit:
                self.counts[int(label)] = self.counts.get(int(label), 0) + 1
                self.images.append(image)
                self.labels.append(int(label))

    def grid(self):
        """uint8 H x W x C, or None when nothing was added."""
        if not self.images:
            return None
        images, labels = np.stack(self.images), np.asarray(self.labels)
        if (labels < 0).all():
            return make_grid(images, nrow=self.per_class)
        return class_grid(images, labels, self.class_names, per_class=self.per_class)
