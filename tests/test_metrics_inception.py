"""InceptionFeatures with a randomly initialised state dict of torch-fidelity's layout (no download, ever)."""

import pytest
import torch

from tailgen.metrics.inception import WEIGHTS_FILE, InceptionFeatures, build_inception_net, default_weights_path
from tailgen.utils import CheckpointError
from tailgen.utils.io import file_digest


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", fail)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    net = build_inception_net(None)  # random init, torch-fidelity's layout (566 tensors)
    assert len(net.state_dict()) == 566
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def extractor(weights_file):
    return InceptionFeatures(weights_file, batch_size=2)


def test_output_shapes_and_spatial_layout(extractor):
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    captured = []
    handle = extractor.net.Mixed_6d.register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        out = extractor(images)  # batch_size 2: two chunks
    finally:
        handle.remove()
    assert out["pool"].shape == (3, 2048)
    assert out["logits"].shape == (3, 1008)
    assert out["spatial"].shape == (3, 7 * 17 * 17)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    # spatial = first 7 channels of Mixed_6d (= its branch1x1, TF mixed_6/conv), flattened in NHWC order
    mixed = torch.cat(captured)
    assert mixed.shape[1:] == (768, 17, 17)
    torch.testing.assert_close(out["spatial"].view(3, 17, 17, 7), mixed[:, :7].permute(0, 2, 3, 1))
    # logits are the unbiased product pool @ W^T (ADM's IS input)
    torch.testing.assert_close(out["logits"], out["pool"] @ extractor.net.fc.weight.T, rtol=1e-4, atol=1e-4)


def test_grey_images_and_identity(extractor, weights_file):
    grey = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)
    out = extractor(grey)
    assert out["pool"].shape == (1, 2048) and out["spatial"].shape == (1, 2023)
    assert extractor.identity.startswith(f"inception-v3-compat/{file_digest(weights_file)[:16]}/")


def test_missing_weights_message_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE
    assert default_weights_path() == expected
    with pytest.raises(CheckpointError) as err:
        InceptionFeatures()
    msg = str(err.value)
    assert WEIGHTS_FILE in msg and str(expected) in msg and "https://" in msg
    with pytest.raises(CheckpointError, match="not found"):
        InceptionFeatures(tmp_path / "nope.pth")


def test_weights_found_in_torch_hub_cache(tmp_path, monkeypatch, weights_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE
    target.parent.mkdir(parents=True)
    target.symlink_to(weights_file)
    ext = InceptionFeatures()
    assert ext.weights_path == target


def test_wrong_file_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(CheckpointError, match="does not fit"):
        InceptionFeatures(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        InceptionFeatures(junk)
