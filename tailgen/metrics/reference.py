"""Reference (real) data for the metrics: readers, feature extraction and an on-disk feature cache.

Sources:

* guided-diffusion reference batches (``VIRTUAL_imagenet*_labeled.npz``): ``arr_0`` uint8 NHWC images,
  optional ``arr_1`` labels, optional precomputed ``mu, sigma`` (pool_3) and ``mu_s, sigma_s`` (spatial) from
  ADM's TF Inception. Those statistics are kept in `Reference.stats`; the suite uses them for FID/sFID only when
  asked (``use_npz_stats``), since mixing TF statistics with torch-fidelity sample features adds the small
  port difference (methods.md §8.3) to the number.
* image folders (png/jpg/jpeg/bmp/webp via PIL; class sub-folders give labels in sorted name order);
* arrays (e.g. Fashion-MNIST from ``tailgen.data.fashion_mnist``): uint8 NCHW / NHW.

Cache: features are stored as ``<cache_dir>/<key>.npz`` with key = sha256(content digest | extractor identity |
format version); content digest = ``file_digest`` of the .npz or ``array_digest`` of the images (+ labels). A
changed file, image set, network or checkpoint gives a new key; files are written with ``atomic_write``.
Under DDP each rank builds the reference; if they start together they may all compute it (same result, the
atomic rename keeps the file whole). Build it once before launching to avoid that.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tailgen.metrics.features import FeatureExtractor, to_uint8_nchw
from tailgen.utils import ConfigError, DataError
from tailgen.utils.io import array_digest, atomic_write, file_digest, read_npz

__all__ = ["Reference", "DEFAULT_CACHE_DIR", "read_reference_npz", "read_image_folder", "extract_features",
           "cached_features", "build_reference"]

DEFAULT_CACHE_DIR = Path("~/.cache/tailgen/features")
_FORMAT = "tailgen-features-v1"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class Reference:
    """Real-side inputs of `MetricSuite`: ``features`` (``pool``/``logits``/``spatial``, CPU float32),
    optional ``labels`` (N,), optional precomputed ``stats`` {"pool" | "spatial": (mu, sigma)}."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    identity: str = ""

    def __len__(self) -> int:
        return next(iter(self.features.values())).shape[0] if self.features else 0


def read_reference_npz(path: str | os.PathLike):
    """(images uint8 NCHW | None, labels | None, stats) from a guided-diffusion reference/sample ``.npz``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"reference batch not found: {path} (guided-diffusion ref batches: "
                        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/...)")
    z = read_npz(path, hint="evaluation.reference must be a guided-diffusion reference batch (.npz); copy it again")
    keys = set(z)
    images = z.get("arr_0")
    labels = z.get("arr_1")
    stats = {name: (z[m].astype(np.float64), z[s].astype(np.float64))
             for name, m, s in (("pool", "mu", "sigma"), ("spatial", "mu_s", "sigma_s")) if m in keys and s in keys}
    if images is None and not stats:
        raise DataError(f"{path} has neither images (arr_0) nor statistics (mu/sigma); keys: {sorted(keys)}")
    if images is not None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"{path}: arr_0 must be uint8 NHWC with 1 or 3 channels, got {images.dtype} "
                            f"{images.shape}")
        images = to_uint8_nchw(images, "NHWC")
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels)).long().flatten()
        if images is None or labels.shape[0] != images.shape[0]:
            labels = None  # arr_1 of another meaning; ignore
    return images, labels, stats


def read_image_folder(path: str | os.PathLike, *, grayscale: bool = False):
    """(images uint8 NCHW, labels | None, class_names) from an image folder.

    Files directly in ``path`` -> no labels; otherwise each sub-folder is a class (sorted names -> 0..C-1).
    All images must have the same size (no implicit resizing: resize deliberately, it changes FID).
    """
    from PIL import Image

    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(i, d) for i, d in enumerate(subdirs)] if subdirs else [(None, root)]
    arrays, labels = [], []
    for label, folder in groups:
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                with Image.open(f) as im:
                    arrays.append(np.asarray(im.convert("L" if grayscale else "RGB")))
                labels.append(label)
    if not arrays:
        raise DataError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) found in {root}")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"images in {root} differ in size ({sorted(shapes)[:4]}...); resize them first")
    x = np.stack(arrays)  # (N, H, W) grey or (N, H, W, 3) RGB
    images = to_uint8_nchw(x, "NCHW" if grayscale else "NHWC")
    y = torch.tensor(labels, dtype=torch.long) if subdirs else None
    return images, y, [d.name for d in subdirs]


def extract_features(extractor: FeatureExtractor, images, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Run ``extractor`` over uint8 NCHW ``images`` in chunks; features returned on CPU (float32)."""
    images = to_uint8_nchw(images)
    out: dict[str, list[torch.Tensor]] = {}
    for part in images.split(chunk):
        for k, v in extractor(part).items():
            out.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _cache_path(cache_dir, content: str, extractor: FeatureExtractor) -> Path:
    key = hashlib.sha256(f"{content}|{extractor.identity}|{_FORMAT}".encode()).hexdigest()[:40]
    return Path(cache_dir).expanduser() / f"{key}.npz"


def cached_features(extractor: FeatureExtractor, images, *, content_key: str | None = None,
                    cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR) -> dict[str, torch.Tensor]:
    """`extract_features` through the disk cache (``cache_dir=None``: no cache).

    ``content_key`` identifies the images (default: ``array_digest(images)``); pass e.g. a file digest to skip
    hashing large arrays.
    """
    if cache_dir is None:
        return extract_features(extractor, images)
    path = _cache_path(cache_dir, content_key or array_digest(to_uint8_nchw(images)), extractor)
    if path.is_file():
        try:
            with np.load(path) as z:
                feats = {k: torch.from_numpy(z[k]) for k in z.files if k != "identity"}
            if set(extractor.provides) <= set(feats):
                return feats
        except (OSError, ValueError):
            pass  # unreadable cache entry: recompute and overwrite
    feats = extract_features(extractor, images)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, identity=np.array(extractor.identity), **{k: v.numpy() for k, v in feats.items()})

    atomic_write(path, write)
    return feats


def build_reference(extractor: FeatureExtractor, *, images=None, labels=None, npz=None, folder=None,
                    cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
                    sample_shape: tuple[int, int, int] | None = None) -> Reference:
    """A `Reference` from exactly one of ``images`` (uint8 NCHW/NHW array), ``npz`` (ref batch) or ``folder``.

    ``labels`` (N,) override labels read from the source. An ``npz`` holding only statistics gives a Reference
    with no features (FID/sFID only). ``sample_shape`` (H, W, C) of the samples to compare: reference images of
    another size or channel count are a DataError (checked before any feature is computed).
    """
    given = [s is not None for s in (images, npz, folder)]
    if sum(given) != 1:
        raise ConfigError("build_reference needs exactly one of images=, npz=, folder=")
    stats: dict = {}
    content = None
    if npz is not None:
        images, src_labels, stats = read_reference_npz(npz)
        content = f"npz:{file_digest(npz)}"
    elif folder is not None:
        images, src_labels, _ = read_image_folder(folder)
    else:
        images, src_labels = to_uint8_nchw(images), None
    if labels is not None:
        src_labels = torch.as_tensor(np.asarray(labels)).long().flatten()
    if images is None:
        return Reference({}, None, stats, extractor.identity)
    shape = (images.shape[2], images.shape[3], images.shape[1])
    if sample_shape is not None and tuple(sample_shape) != shape:
        raise DataError(
            f"the samples are {'x'.join(map(str, sample_shape))} (HxWxC) but the reference images are "
            f"{'x'.join(map(str, shape))}: evaluate against reference data of the samples' size and channels "
            "(evaluation.reference)"
        )
    if content is None:
        content = array_digest(images)
    if src_labels is not None and src_labels.shape[0] != images.shape[0]:
        raise DataError(f"{images.shape[0]} reference images but {src_labels.shape[0]} labels")
    feats = cached_features(extractor, images, content_key=content, cache_dir=cache_dir)
    return Reference(feats, src_labels, stats, extractor.identity)
