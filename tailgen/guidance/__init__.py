"""Layer 3: guidance plug-ins. Each guidance lives in a file of its own; ``base`` holds the contract."""

from tailgen.guidance.base import (
    ClassifierEval,
    GradientGuidance,
    Guidance,
    GuidanceStack,
    GuidedPrediction,
    StepContext,
    schedule_weight,
)

__all__ = [
    "ClassifierEval",
    "GradientGuidance",
    "Guidance",
    "GuidanceStack",
    "GuidedPrediction",
    "StepContext",
    "schedule_weight",
]
