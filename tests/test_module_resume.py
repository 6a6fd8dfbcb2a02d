"""`tailgen predict` resumes and guards its output folder (tiny fixture models, few steps):
kill -9 mid-run then the same command reuses every verified shard and ends bit-identical to an uninterrupted run;
another config into the same folder is refused unless --writer.overwrite=true; an unusable folder fails before
sampling; samples.json records what made samples.npz; `tailgen --version`; `--data.labels 3` / `12`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_module_predict import write_config

import tailgen
from tailgen.cli import main
from tailgen.module import shards
from tailgen.module.guided import GuidedDiffusion
from tailgen.utils.io import file_digest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}


def predict(config, *flags, steps=None):
    extra = [f"--model.init_args.diffusion.timestep_respacing={steps}"] if steps else []
    main(["predict", "--config", str(config), *extra, *flags])


def error_lines(capsys) -> list[str]:
    """tailgen's own stderr lines (Lightning may add warnings when pytest's warning filters are off)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("tailgen")]


def load(out: Path) -> dict:
    with np.load(out / "samples.npz") as f:
        return dict(f)


@pytest.fixture
def count_batches(monkeypatch):
    """Counts the batches GuidedDiffusion samples in this process."""
    calls = []
    original = GuidedDiffusion.predict_step

    def counted(self, batch, batch_idx=0):
        calls.append(batch["index"].tolist())
        return original(self, batch, batch_idx)

    monkeypatch.setattr(GuidedDiffusion, "predict_step", counted)
    return calls


def test_kill_9_then_same_command_resumes_bit_identically(tmp_path, capsys, count_batches):
    config = write_config(tmp_path, data={"num_samples": 8, "batch_size": 2})
    flags = ["--model.init_args.diffusion.timestep_respacing=12"]
    predict(config, *flags, "--writer.output_dir", str(tmp_path / "full"))
    assert len(count_batches) == 4
    full = load(tmp_path / "full")

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tailgen.cli", "predict", "--config", str(config), *flags, f"--writer.output_dir={out}"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not list((out / "shards").glob("[0-9]*.npz")):  # >= 1 finished batch
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = {p.name for p in (out / "shards").glob("[0-9]*.npz")}
    assert 1 <= len(done) < 4 and not (out / "samples.npz").exists()  # killed mid-run: nothing complete-looking
    capsys.readouterr()
    count_batches.clear()

    predict(config, *flags, "--writer.output_dir", str(out))  # the same command again
    assert f"resuming: {2 * len(done)} of 8 samples already in" in capsys.readouterr().out
    assert len(count_batches) == 4 - len(done)  # only the missing batches are sampled
    assert not {f"{i[0]:08d}-{i[-1]:08d}.npz" for i in count_batches} & done
    resumed = load(out)
    for key in ("arr_0", "arr_1", "seeds", "indices"):
        np.testing.assert_array_equal(resumed[key], full[key], err_msg=key)  # bit for bit, in index order
    assert not (out / "shards").exists() and not list(tmp_path.glob("**/shards.old-*"))

    count_batches.clear()
    predict(config, *flags, "--writer.output_dir", str(out))  # finished: nothing to sample, nothing rewritten
    assert count_batches == [] and "nothing to do" in capsys.readouterr().out
    np.testing.assert_array_equal(load(out)["arr_0"], full["arr_0"])


def test_bad_shards_are_dropped_and_resampled(tmp_path, capsys, count_batches):
    """Shards are verified: a corrupt file, a tampered image, a wrong image size (with a matching digest) and a
    stray temporary are replaced, not merged; the valid shard is reused."""
    config = write_config(tmp_path, data={"num_samples": 8, "batch_size": 2})
    out = tmp_path / "out"
    predict(config, steps=2)
    full = load(out)
    # Rebuild an interrupted folder by hand: three valid shards, then damage two of them.
    run_hash = json.loads((out / "samples.json").read_text())["config_hash"]
    (out / "samples.npz").unlink()
    (out / "samples.json").unlink()
    shard_dir = out / "shards"
    shard_dir.mkdir()
    (shard_dir / "run.json").write_text(json.dumps({"config_hash": run_hash}))
    for start in (0, 2, 4, 6):
        part = {"images": full["arr_0"][start:start + 2], "labels": full["arr_1"][start:start + 2],
                "seeds": full["seeds"][start:start + 2], "indices": full["indices"][start:start + 2]}
        if start == 6:
            part["images"] = part["images"][:, :16]
        shards.write_shard(shard_dir, part, run_hash)
    (shard_dir / "00000000-00000001.npz").write_bytes(b"truncated")
    tampered = dict(np.load(shard_dir / "00000002-00000003.npz"))
    tampered["images"] = tampered["images"] ^ 1
    np.savez(shard_dir / "00000002-00000003.npz", **tampered)
    (shard_dir / ".00000004-00000005.npz.tmp").write_bytes(b"partial")
    count_batches.clear()
    predict(config, steps=2)
    err = capsys.readouterr().err
    assert "unreadable" in err and "digest" in err and "expected uint8" in err
    assert sorted(count_batches) == [[0, 1], [2, 3], [6, 7]]
    np.testing.assert_array_equal(load(out)["arr_0"], full["arr_0"])


def test_another_config_is_refused_unless_overwrite(tmp_path, capsys):
    config = write_config(tmp_path, data={"num_samples": 3})
    out = tmp_path / "out"
    predict(config, steps=2)
    record = json.loads((out / "samples.json").read_text())
    first = load(out)
    assert record["num_samples"] == 3 and record["indices"] == [0, 2] and record["base_seed"] == 3
    assert record["versions"]["tailgen"] == tailgen.__version__ and record["versions"]["torch"]
    assert record["samples_sha256"] == file_digest(out / "samples.npz")
    assert record["resolved_config"]["data"]["init_args"]["num_samples"] == 3
    capsys.readouterr()

    for change in (["--model.init_args.guidances.cg.init_args.scale=2.0"], ["--data.init_args.seed=4"],
                   ["--data.init_args.num_samples=4"], ["--model.init_args.diffusion.timestep_respacing=3"]):
        with pytest.raises(SystemExit) as exit_info:
            predict(config, "--model.init_args.diffusion.timestep_respacing=2", *change)
        err = error_lines(capsys)
        assert exit_info.value.code == 2 and len(err) == 1, err
        assert "holds samples of another configuration" in err[0] and "--writer.overwrite=true" in err[0], err
        np.testing.assert_array_equal(load(out)["arr_0"], first["arr_0"])  # untouched

    # batch size and progress bars are not part of what a sample is: same config, nothing to do
    predict(config, "--data.init_args.batch_size=3", "--model.init_args.progress=true", steps=2)
    assert "nothing to do" in capsys.readouterr().out

    predict(config, "--data.init_args.seed=4", "--writer.overwrite=true", steps=2)
    second = load(out)
    assert json.loads((out / "samples.json").read_text())["base_seed"] == 4
    assert not np.array_equal(second["seeds"], first["seeds"])


def test_unknown_provenance_is_refused(tmp_path, capsys):
    """A samples.npz nobody recorded (older tailgen, another tool) is not silently replaced."""
    config = write_config(tmp_path, data={"num_samples": 2})
    (tmp_path / "out").mkdir()
    np.savez(tmp_path / "out" / "samples.npz", arr_0=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(SystemExit):
        predict(config, steps=2)
    assert "samples.npz without samples.json: an unknown config" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file", "unwritable"])
def test_unusable_output_dir_fails_before_sampling(tmp_path, capsys, count_batches, where):
    config = write_config(tmp_path, data={"num_samples": 2})
    (tmp_path / "file").write_text("x")
    target = {"under_a_file": tmp_path / "file" / "out", "is_a_file": tmp_path / "file"}.get(where)
    if where == "unwritable":
        if os.geteuid() == 0:  # root writes anywhere a mode allows nothing; /proc refuses new entries
            target = Path("/proc/tailgen-out")
        else:
            target = tmp_path / "ro"
            target.mkdir(mode=0o555)
    with pytest.raises(SystemExit) as exit_info:
        predict(config, "--writer.output_dir", str(target), steps=2)
    err = error_lines(capsys)
    assert exit_info.value.code == 2 and len(err) == 1 and "writer.output_dir" in err[0], err
    assert ("is a file, not a folder" if where != "unwritable" else "not writable") in err[0]
    assert count_batches == []  # no sampling time lost


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tailgen {tailgen.__version__}"
    assert tailgen.__version__[0].isdigit()


def test_single_label_from_the_command_line(tmp_path, capsys):
    config = write_config(tmp_path, data={"num_samples": 2})
    predict(config, "--data.init_args.labels", "3", steps=2)
    assert load(tmp_path / "out")["arr_1"].tolist() == [3, 3]
    with pytest.raises(SystemExit) as exit_info:
        predict(config, "--data.init_args.labels", "12", "--model.init_args.num_classes=10", steps=2)
    err = error_lines(capsys)
    assert exit_info.value.code == 2 and len(err) == 1
    assert "label 12 is out of range" in err[0] and "num_classes=10" in err[0], err


def test_folder_claims(tmp_path):
    """A samples.npz whose merge was cut short (no samples.json yet) belongs to the run in shards/run.json."""
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(shards.ConfigError, match="unknown config"):
        shards.refuse_foreign(tmp_path, "a" * 64)
    (tmp_path / "shards").mkdir()
    shards.write_json(tmp_path / "shards" / "run.json", {"config_hash": "a" * 64})
    shards.refuse_foreign(tmp_path, "a" * 64)
    with pytest.raises(shards.ConfigError, match=r"shards/run.json: config aaaaaaaaaaaa; this run: config bbbbbbbbbbbb"):
        shards.refuse_foreign(tmp_path, "b" * 64)
