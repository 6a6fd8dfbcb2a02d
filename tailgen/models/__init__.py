"""Layer 1: networks. ADM UNet / SuperRes / EncoderUNet classifier, the ResNet judge, builders from
guided-diffusion flags, presets of the official checkpoints, safe checkpoint loading and the YAML-buildable
`NetworkSpec`."""

from tailgen.models.adm import (
    classifier_defaults,
    create_classifier,
    create_model,
    create_superres_model,
    flags_from_string,
    model_defaults,
    superres_defaults,
)
from tailgen.models.checkpoint import extract_state_dict, load_checkpoint, load_into, load_state_dict_file
from tailgen.models.encoder import EncoderUNetModel
from tailgen.models.resnet import ResNetClassifier, create_resnet_classifier
from tailgen.models.presets import PRESETS, build_preset, get_preset, register_preset
from tailgen.models.spec import NetworkSpec
from tailgen.models.unet import SuperResModel, UNetModel

__all__ = [
    "UNetModel",
    "SuperResModel",
    "EncoderUNetModel",
    "ResNetClassifier",
    "create_resnet_classifier",
    "create_model",
    "create_classifier",
    "create_superres_model",
    "model_defaults",
    "classifier_defaults",
    "superres_defaults",
    "flags_from_string",
    "PRESETS",
    "build_preset",
    "get_preset",
    "register_preset",
    "load_state_dict_file",
    "extract_state_dict",
    "load_into",
    "load_checkpoint",
    "NetworkSpec",
]
