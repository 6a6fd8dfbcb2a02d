"""Inception-v3 features compatible with ADM's TF evaluator (via torch-fidelity's port of the 2015 graph).

Network: ``torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3`` (the TF
``classify_image_graph_def.pb`` weights converted by torch-fidelity; the same network torchmetrics' FID uses).

Outputs (per image):

* ``pool``: pool_3, 2048-d (FID, KID, precision/recall).
* ``logits``: ``pool_3 @ W_softmax`` *without* the bias, 1008-d (torch-fidelity's ``logits_unbiased``; ADM's
  IS uses the same ``softmax/logits/MatMul`` product).
* ``spatial``: sFID features: TF ``mixed_6/conv:0`` first 7 channels, flattened in TF's NHWC order
  (17 * 17 * 7 = 2023-d).

Mapping ``mixed_6/conv`` -> ``Mixed_6d.branch1x1`` and its uncertainty: torch-fidelity's weight converter
(``util_convert_inception_weights``) maps TF ``mixed_6/conv/{conv2d_params,batchnorm}`` to
``Mixed_6d.branch1x1.{conv,bn}`` (TF ``mixed``..``mixed_10`` = torch ``Mixed_5b``..``Mixed_7c``); guided-diffusion
issue #109 reaches the same answer ("first 192 channels of Mixed_6d"). Not verified against the TF graph here:
(a) we take the BasicConv2d output, i.e. after BN + ReLU; we believe the TF node named ``mixed_6/conv`` is that
ReLU (its children are ``.../Conv2D`` and ``.../batchnorm``), but did not run TF to confirm; (b) channel order is
taken as identical (the converter permutes conv weights HWIO -> OIHW only). One public port uses
``Mixed_6e.branch1x1`` instead; we believe that is off by one block. The 7 channels must be sliced on the
channel axis of the NCHW tensor (a port of ADM's evaluator reported sFID 299 from a layout mistake, guided-diffusion
#159, fixed in lavinal712/ADM-evaluation-suite-pytorch PR #2). The flatten order (h, w, c) only matters when
comparing with ADM's precomputed ``mu_s``/``sigma_s`` (Fréchet distance is invariant to a permutation of
coordinates applied to both sides).

Resize: torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x`` to 299 x 299 (TF1 ``ResizeBilinear``,
``align_corners=False``, no antialiasing), as inside ADM's graph; input scaled (x - 128) / 128. This equals
torchmetrics' FID with ``antialias=False``, *not* its default. Grey (1-channel) images are repeated to 3 channels.

Weights: never downloaded. ``weights_path`` or ``$TORCH_HOME/hub/checkpoints/<WEIGHTS_FILE>``; if absent one
`CheckpointError` names the file, the URL, and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch_fidelity.feature_extractor_inceptionv3 as tfi

from tailgen.metrics.features import FeatureExtractor
from tailgen.utils import CheckpointError
from tailgen.utils.io import file_digest

__all__ = ["InceptionFeatures", "WEIGHTS_FILE", "WEIGHTS_URL", "default_weights_path", "build_inception_net"]

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
_SENTINEL = object()


def default_weights_path() -> Path:
    """``$TORCH_HOME/hub/checkpoints/<WEIGHTS_FILE>`` (torch hub cache; default ``~/.cache/torch``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


class _TorchFidelityInception(tfi.FeatureExtractorInceptionV3):
    """torch-fidelity's network; ``load_state_dict(_SENTINEL)`` is a no-op so construction loads nothing."""

    def load_state_dict(self, state_dict, *args, **kwargs):
        if state_dict is _SENTINEL:
            return None
        return super().load_state_dict(state_dict, *args, **kwargs)


def build_inception_net(state_dict: dict | None = None) -> torch.nn.Module:
    """torch-fidelity's FID Inception, with ``state_dict`` loaded (strict) or randomly initialised if None.

    torch-fidelity's constructor always fetches weights; its module-level ``load_state_dict_from_url`` is
    swapped for the duration of the constructor to return a sentinel (no network, nothing loaded), then
    ``state_dict`` is loaded here. Random initialisation is for tests and tools (files with the right layout).
    """
    original = tfi.load_state_dict_from_url
    tfi.load_state_dict_from_url = lambda *a, **k: _SENTINEL
    try:
        net = _TorchFidelityInception("inception-v3-compat", ["2048", "logits_unbiased"])
    finally:
        tfi.load_state_dict_from_url = original
    if state_dict is not None:
        net.load_state_dict(state_dict)
    return net.float().eval().requires_grad_(False)


def _resolve(weights_path) -> Path:
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"Inception weights file not found: {path}. Set evaluation.inception_weights "
                f"(--model.init_args.evaluation.init_args.inception_weights=PATH) to the path of {WEIGHTS_FILE} "
                f"(download {WEIGHTS_URL} on a machine with network access).")
        return path
    path = default_weights_path()
    if not path.is_file():
        raise CheckpointError(
            f"Inception weights {WEIGHTS_FILE} not found at {path} (torch hub cache, $TORCH_HOME/hub/checkpoints). "
            f"tailgen never downloads it: fetch {WEIGHTS_URL} on a machine with network access and copy it to "
            f"{path}, or set evaluation.inception_weights (--model.init_args.evaluation.init_args.inception_weights=PATH).")
    return path


class InceptionFeatures(FeatureExtractor):
    """ADM-evaluator-compatible Inception-v3 features: ``pool`` (2048), ``logits`` (1008), ``spatial`` (2023).

    Args:
        weights_path: the torch-fidelity weights file; default: the torch hub cache (see `default_weights_path`).
        spatial: also return sFID features (one forward hook on ``Mixed_6d.branch1x1``; no extra pass).
        batch_size: images per forward (memory at 299 x 299: ~20 MB activations per image in fp32).
    """

    provides = ("pool", "logits", "spatial")

    def __init__(self, weights_path: str | os.PathLike | None = None, *, spatial: bool = True,
                 batch_size: int = 64):
        super().__init__(batch_size)
        self.weights_path = _resolve(weights_path)
        try:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated / not a state dict / pickled code
            raise CheckpointError(f"cannot read Inception weights {self.weights_path}: {e}. Re-download "
                                  f"{WEIGHTS_URL}.") from e
        try:
            self.net = build_inception_net(state)
        except RuntimeError as e:
            raise CheckpointError(f"{self.weights_path} does not fit torch-fidelity's Inception "
                                  f"(expected {WEIGHTS_FILE}): {str(e)[:500]}") from e
        self.spatial = spatial
        if not spatial:
            self.provides = ("pool", "logits")

    def _identity(self) -> str:
        return (f"inception-v3-compat/{file_digest(self.weights_path)[:16]}/tf1-bilinear-299"
                f"/spatial=Mixed_6d.branch1x1[:7]-hwc")

    def _extract(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        captured: list[torch.Tensor] = []
        handle = None
        if self.spatial:
            handle = self.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, out: captured.append(out))
        try:
            pool, logits = self.net(x.contiguous())
        finally:
            if handle is not None:
                handle.remove()
        out = {"pool": pool, "logits": logits}
        if self.spatial:
            # NCHW (N, 192, 17, 17) -> first 7 channels -> TF's NHWC flatten order (N, 17 * 17 * 7).
            out["spatial"] = captured[-1][:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1).float()
        return out
