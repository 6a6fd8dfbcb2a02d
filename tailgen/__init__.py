"""tailgen: sampling-time guidance for pretrained class-conditional diffusion models.

The Python API, without the command line::

    from tailgen import GuidedDiffusion, NetworkSpec, ClassifierGuidance, Evaluation
    model = GuidedDiffusion(NetworkSpec("fashion_diffusion"), classifier=NetworkSpec("fashion_noisy_classifier"),
                            guidances={"cg": ClassifierGuidance(scale=1.0)}, diffusion={"timestep_respacing": "50"})
    images = model.generate(labels=[0, 1, 2])          # uint8 N x H x W x C; seeds optional
    metrics = Evaluation(feature_network=NetworkSpec("fashion_clean_classifier")).evaluate(images, [0, 1, 2])

Names are imported on first use, so ``import tailgen.guidance`` (or any lower layer) does not pull in Lightning.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tailgen")
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"

_EXPORTS = {
    # sampling (the LightningModule works as a plain nn.Module: no Trainer needed)
    "GuidedDiffusion": "tailgen.module.guided",
    "NetworkSpec": "tailgen.models.spec",
    "ExpertSpec": "tailgen.models.spec",
    "SamplingDataModule": "tailgen.module.sampling_data",
    "sample_seed": "tailgen.module.sampling_data",
    # samplers without the LightningModule: sample("ddim", SamplingRun(ADMDenoiser(unet, process), ...), x, process)
    "SamplingRun": "tailgen.sampling",
    "sample": "tailgen.sampling",
    "DiffusionProcess": "tailgen.diffusion",
    "ADMDenoiser": "tailgen.diffusion",
    "NoisyClassifier": "tailgen.diffusion",
    "SeededNoise": "tailgen.diffusion",
    # guidances
    "Guidance": "tailgen.guidance",
    "GradientGuidance": "tailgen.guidance",
    "GuidanceStack": "tailgen.guidance",
    "StepContext": "tailgen.guidance",
    "ClassifierGuidance": "tailgen.guidance",
    "EntropyScaledClassifierGuidance": "tailgen.guidance",
    "ClassifierFreeGuidance": "tailgen.guidance",
    "LowDensityGuidance": "tailgen.guidance",
    "PredictedImagePull": "tailgen.guidance",
    "PredictedImageGradient": "tailgen.guidance",
    "BiNoising": "tailgen.guidance",
    # evaluation and metrics
    "Evaluation": "tailgen.module.evaluation",
    "MetricSuite": "tailgen.metrics",
    "ClassifierFeatures": "tailgen.metrics",
    "InceptionFeatures": "tailgen.metrics",
    "prdc": "tailgen.metrics",
    "frechet_distance": "tailgen.metrics",
    "inception_score": "tailgen.metrics",
    # pictures
    "make_grid": "tailgen.utils.images",
    "save_png": "tailgen.utils.images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # resolve once
        return value
    raise AttributeError(f"module 'tailgen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
