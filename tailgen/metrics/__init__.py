"""tailgen.metrics: feature extractors, FID/sFID/IS/KID, precision/recall/density/coverage, class-wise and
tail metrics, reference caches (torchmetrics; no Lightning). See `MetricSuite` for the collection a
LightningModule holds. `InceptionFeatures` is imported on first use."""

from tailgen.metrics.classwise import ClassConditionalMetrics
from tailgen.metrics.features import ClassifierFeatures, FeatureExtractor, to_uint8_nchw
from tailgen.metrics.fid import (FrechetDistance, KernelDistance, frechet_distance, frechet_distance_features,
                                 gaussian_stats, kernel_distance)
from tailgen.metrics.inception_score import InceptionScore, inception_score
from tailgen.metrics.manifold import PrecisionRecallDensityCoverage, knn_radii, manifold_masks, prdc
from tailgen.metrics.reference import (DEFAULT_CACHE_DIR, Reference, build_reference, cached_features,
                                       extract_features, read_image_folder, read_reference_npz)
from tailgen.metrics.suite import METRIC_NAMES, MetricSuite
from tailgen.metrics.tail import TailIndicators

__all__ = [
    "FeatureExtractor", "ClassifierFeatures", "InceptionFeatures", "to_uint8_nchw",
    "FrechetDistance", "KernelDistance", "frechet_distance", "frechet_distance_features", "gaussian_stats",
    "kernel_distance", "InceptionScore", "inception_score",
    "PrecisionRecallDensityCoverage", "prdc", "manifold_masks", "knn_radii",
    "ClassConditionalMetrics", "TailIndicators",
    "Reference", "DEFAULT_CACHE_DIR", "build_reference", "cached_features", "extract_features",
    "read_image_folder", "read_reference_npz",
    "MetricSuite", "METRIC_NAMES",
]


def __getattr__(name: str):
    if name == "InceptionFeatures":
        from tailgen.metrics.inception import InceptionFeatures

        return InceptionFeatures
    raise AttributeError(f"module 'tailgen.metrics' has no attribute {name!r}")
