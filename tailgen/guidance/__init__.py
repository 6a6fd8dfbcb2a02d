"""Layer 3: guidance plug-ins. Each guidance lives in a file of its own; ``base`` holds the contract and
``stack`` composes guidances around a sampler step."""

from tailgen.guidance.base import (
    ClassifierEval,
    GradientGuidance,
    Guidance,
    GuidedPrediction,
    StepContext,
    UnconditionalPath,
    denoised_gradient,
    max_normalized,
    schedule_weight,
)
from tailgen.guidance.bi_noising import BiNoising
from tailgen.guidance.cads import CADS
from tailgen.guidance.calibrated_target import CalibratedTargetGuidance
from tailgen.guidance.classifier import ClassifierGuidance, EntropyScaledClassifierGuidance
from tailgen.guidance.classifier_free import ClassifierFreeGuidance
from tailgen.guidance.langevin_pull import LangevinPull
from tailgen.guidance.hardness import SehwagHardnessGuidance
from tailgen.guidance.low_density import LowDensityGuidance
from tailgen.guidance.predicted_image import PredictedImageGradient, PredictedImagePull
from tailgen.guidance.stack import GuidanceStack
from tailgen.guidance.self_guided_minority import SelfGuidedMinorityGuidance

__all__ = [
    "BiNoising",
    "CADS",
    "CalibratedTargetGuidance",
    "ClassifierEval",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "EntropyScaledClassifierGuidance",
    "GradientGuidance",
    "Guidance",
    "GuidanceStack",
    "GuidedPrediction",
    "LangevinPull",
    "LowDensityGuidance",
    "PredictedImageGradient",
    "PredictedImagePull",
    "SehwagHardnessGuidance",
    "SelfGuidedMinorityGuidance",
    "StepContext",
    "UnconditionalPath",
    "denoised_gradient",
    "max_normalized",
    "schedule_weight",
]
