"""What a ``tailgen predict`` output folder holds, and how a rerun decides what is already done (no Lightning).

    output_dir/
        shards/run.json                 in progress: the config hash this folder's shards belong to
        shards/<first>-<last>.npz       one per finished batch: images, labels, seeds, indices, config_hash, digest
        samples.npz                     finished: all N samples in index order (guided-diffusion layout)
        samples.json                    finished: provenance (config hash + resolved config, versions, seeds, sha256)
        grid.png
        config.yaml                     the resolved config of the run that claimed the folder (tailgen predict)

A shard counts as done only if it verifies: it loads, its ``config_hash`` is this run's, its ``digest`` (SHA-256 of
the arrays, recorded at write time) matches, and its indices / labels / seeds are those the run's plan gives for
those indices. Anything else is removed and recomputed. A folder claimed by another config (``run.json``,
``samples.json``, a samples.npz without provenance, or shards in an older format) is refused unless the user asks
to overwrite.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tailgen.utils import ConfigError
from tailgen.utils.io import array_digest, atomic_write, file_digest

ARRAYS = ("images", "labels", "seeds", "indices")
RUN_FILE, SAMPLES, PROVENANCE, GRID, CONFIG = "run.json", "samples.npz", "samples.json", "grid.png", "config.yaml"


def short(config_hash: str) -> str:
    return config_hash[:12]


def check_writable(folder: Path, key: str = "writer.output_dir") -> None:
    """Create ``folder`` and write a probe file in it; one clear ConfigError (naming ``key``) if that is impossible."""
    blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"{key} {folder} cannot be created: {blocker} is a file, not a folder; "
                          f"choose another --{key}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"ok")
    except OSError as exc:
        raise ConfigError(f"{key} {folder} is not writable ({exc.strerror or exc}); "
                          f"choose another --{key}") from None


# ---------------------------------------------------------------------------------------------------- shards


def write_shard(shard_dir: Path, arrays: dict[str, np.ndarray], config_hash: str) -> Path:
    """Atomically write one batch as ``<first index>-<last index>.npz`` with its config hash and content digest."""
    indices = arrays["indices"]
    name = f"{int(indices.min()):08d}-{int(indices.max()):08d}.npz"
    digest = array_digest(*(arrays[k] for k in ARRAYS))
    return atomic_write(shard_dir / name, lambda tmp: np.savez(
        tmp.open("wb"), **arrays, config_hash=np.array(config_hash), digest=np.array(digest)))


def read_shard(path: Path, config_hash: str, plan: dict[str, np.ndarray],
               image_shape: Optional[tuple] = None) -> dict[str, np.ndarray]:
    """The arrays of a shard that verifies against this run (``image_shape``: one sample's, e.g. H×W×C), else
    ValueError naming what is wrong."""
    try:
        with np.load(path) as f:
            data = {k: f[k] for k in (*ARRAYS, "config_hash", "digest")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"unreadable ({type(exc).__name__})") from None
    if str(data["config_hash"]) != config_hash:
        raise ValueError(f"made by config {short(str(data['config_hash']))}")
    if array_digest(*(data[k] for k in ARRAYS)) != str(data["digest"]):
        raise ValueError("content does not match the digest recorded at write time")
    images, indices = data["images"], data["indices"]
    n = len(indices)
    if images.dtype != np.uint8 or images.ndim < 2 or len(images) != n or (
            image_shape is not None and images.shape[1:] != tuple(image_shape)):
        raise ValueError(f"images {images.dtype} {images.shape} for {n} indices (expected uint8 N×{image_shape})")
    if indices.dtype.kind not in "iu" or n == 0 or indices.min() < 0 or indices.max() >= len(plan["labels"]):
        raise ValueError("indices outside this run's 0..N-1")
    for key in ("labels", "seeds"):
        if not np.array_equal(data[key], plan[key][indices]):
            raise ValueError(f"{key} differ from this run's {key} for those indices")
    return {k: data[k] for k in ARRAYS}


def scan_shards(shard_dir: Path, config_hash: str, plan: dict[str, np.ndarray], image_shape: Optional[tuple] = None,
                remove_bad: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
    """All verified samples in ``shard_dir`` (merged, in index order) and a note per shard that was dropped
    (removed when ``remove_bad``: its samples are recomputed). Leftover temporary files are removed."""
    for tmp in shard_dir.glob(".*"):
        tmp.unlink(missing_ok=True)
    parts, notes = [], []
    seen = np.zeros(len(plan["labels"]), dtype=bool)
    for path in sorted(shard_dir.glob("*.npz")):
        try:
            part = read_shard(path, config_hash, plan, image_shape)
            if seen[part["indices"]].any() or len(np.unique(part["indices"])) != len(part["indices"]):
                raise ValueError("repeats samples another shard already holds")
        except ValueError as exc:
            notes.append(f"{path.name}: {exc}")
            if remove_bad:
                path.unlink(missing_ok=True)
            continue
        seen[part["indices"]] = True
        parts.append(part)
    if not parts:
        return {"indices": np.zeros(0, dtype=np.int64)}, notes
    merged = {k: np.concatenate([p[k] for p in parts]) for k in ARRAYS}
    order = np.argsort(merged["indices"], kind="stable")
    return {k: v[order] for k, v in merged.items()}, notes


# ---------------------------------------------------------------------------------------------------- folder


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def folder_claims(output_dir: Path) -> list[tuple[str, Optional[str]]]:
    """(what, config hash or None if unknown) for everything in ``output_dir`` that belongs to some run."""
    claims = []
    shard_dir = output_dir / "shards"
    if (output_dir / PROVENANCE).exists():
        claims.append((PROVENANCE, (read_json(output_dir / PROVENANCE) or {}).get("config_hash")))
    elif (output_dir / SAMPLES).exists() and not (shard_dir / RUN_FILE).exists():  # else: a merge cut short
        claims.append((f"{SAMPLES} without {PROVENANCE}", None))
    if (shard_dir / RUN_FILE).exists():
        claims.append((f"shards/{RUN_FILE}", (read_json(shard_dir / RUN_FILE) or {}).get("config_hash")))
    elif shard_dir.is_dir() and any(shard_dir.glob("*.npz")):
        claims.append((f"shards without {RUN_FILE}", None))
    return claims


def refuse_foreign(output_dir: Path, config_hash: str, key: str = "writer.output_dir") -> None:
    """ConfigError if ``output_dir`` holds samples or shards of another (or an unknown) configuration."""
    foreign = [(what, h) for what, h in folder_claims(output_dir) if h != config_hash]
    if foreign:
        what, other = foreign[0]
        made_by = f"config {short(other)}" if other else "an unknown config"
        raise ConfigError(
            f"{key} {output_dir} holds samples of another configuration ({what}: {made_by}; this run: "
            f"config {short(config_hash)}): pass --writer.overwrite=true to replace them, or choose another "
            f"--{key}")


def clear_outputs(output_dir: Path) -> None:
    """Remove what tailgen wrote in ``output_dir`` (shards, samples, provenance, grid, config); nothing else."""
    shutil.rmtree(output_dir / "shards", ignore_errors=True)
    for name in (SAMPLES, PROVENANCE, GRID, CONFIG):
        (output_dir / name).unlink(missing_ok=True)
    for name in (SAMPLES, PROVENANCE, GRID, CONFIG):  # temporaries of an interrupted atomic write
        for tmp in output_dir.glob(f".{name}.*"):
            tmp.unlink(missing_ok=True)


def finished(output_dir: Path, config_hash: str) -> bool:
    """True if samples.npz is this config's, complete and unchanged (its SHA-256 is the one samples.json records)."""
    record = read_json(output_dir / PROVENANCE)
    samples = output_dir / SAMPLES
    return bool(record and record.get("config_hash") == config_hash and samples.is_file()
                and record.get("samples_sha256") == file_digest(samples))


def write_json(path: Path, record: dict[str, Any]) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str) + "\n"))


def write_samples_npz(path: Path, samples: dict[str, np.ndarray]) -> Path:
    """guided-diffusion layout: arr_0 = images (uint8 NHWC), arr_1 = labels (int64); seeds and indices beside."""
    return atomic_write(path, lambda tmp: np.savez(
        tmp.open("wb"), arr_0=samples["images"], arr_1=samples["labels"].astype(np.int64),
        seeds=samples["seeds"], indices=samples["indices"]))
