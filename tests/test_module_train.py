import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tailgen.module.datamodules import FashionMNISTDataModule, ToyDataModule
from tailgen.module.train import ClassifierTrainer, DiffusionTrainer, ema_state_dict
from tailgen.utils import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


@pytest.fixture(autouse=True)
def _one_thread():
    # small networks: one thread is fastest, and several threads stall badly on a loaded 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

TOY_DIFF = dict(diffusion_steps=1000, noise_schedule="cosine", learn_sigma=False, sigma_small=True)
ADM_TINY = dict(image_size=28, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                attention_resolutions="14", num_head_channels=32, learn_sigma=True, class_cond=True, num_classes=11,
                resblock_updown=True, use_scale_shift_norm=True)


def _fit(module, data, tmp_path, steps=3):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
                        num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(module, data)
    return trainer


def test_toy_diffusion_trainer_fit_export(tmp_path):
    from export_weights import export, load_exported

    torch.manual_seed(0)
    m = DiffusionTrainer({"width": 32, "depth": 1}, TOY_DIFF, arch="toy_mlp", num_classes=3, ema_decay=0.99)
    before = [p.clone() for p in m.ema.parameters()]
    trainer = _fit(m, ToyDataModule(num_samples=512, batch_size=128, val_samples=128), tmp_path)
    assert int(m.ema_updates) == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, m.ema.parameters()))
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    sd, which = ema_state_dict(torch.load(ckpt, weights_only=True))
    assert which == "ema" and "label_emb.weight" in sd
    pt, js = export(ckpt, "toy_test", tmp_path / "w")
    assert next(iter(torch.load(pt, weights_only=True).values())).dtype == torch.float16
    net, info = load_exported(pt)
    assert info["kind"] == "model" and info["null_label"] == 3 and info["arch"] == "toy_mlp"
    x = torch.randn(4, 2)
    torch.testing.assert_close(net(x, torch.tensor([1, 2, 3, 4]), None),
                               m.ema.float()(x, torch.tensor([1, 2, 3, 4]), None), atol=1e-2, rtol=1e-2)


def test_label_dropout_and_hybrid_loss():
    torch.manual_seed(0)
    m = DiffusionTrainer(ADM_TINY, dict(diffusion_steps=1000, noise_schedule="cosine", learn_sigma=True),
                         num_classes=10, label_dropout=0.5, ema_decay=0)
    y = torch.zeros(1000, dtype=torch.long)
    frac = (m.drop_labels(y) == 10).float().mean().item()
    assert 0.4 < frac < 0.6
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    terms = m.losses(m.net, x0, torch.tensor([3, 10]), torch.tensor([0, 500]), torch.randn_like(x0))
    assert terms["vb"].shape == (2,) and (terms["vb"] > 0).all() and torch.isfinite(terms["loss"]).all()
    # stop-gradient: the vb term must not reach the eps channels
    m.net.zero_grad()
    terms["vb"].sum().backward()
    out_conv = m.net.out[-1]
    assert out_conv.weight.grad[:1].abs().sum() == 0 and out_conv.weight.grad[1:].abs().sum() > 0


def test_adm_requires_null_label_row():
    with pytest.raises(ConfigError, match="num_classes = 11"):
        DiffusionTrainer({**ADM_TINY, "num_classes": 10}, {"learn_sigma": True}, num_classes=10)


def test_toy_classifier_trainer(tmp_path):
    torch.manual_seed(0)
    m = ClassifierTrainer({"width": 32, "depth": 1}, TOY_DIFF, arch="toy_mlp", noised=True, ema_decay=0.9)
    _fit(m, ToyDataModule(num_samples=512, batch_size=128, val_samples=128), tmp_path, steps=2)
    logits = m.eval_net(torch.randn(3, 2), torch.tensor([0, 10, 999]))
    assert logits.shape == (3, 3)


def test_fashion_datamodule_tmp(tmp_path):
    import numpy as np

    from test_data_fashion import _tiny_folder

    _tiny_folder(tmp_path, n=10, prefix="train")
    _tiny_folder(tmp_path, n=6, prefix="t10k")
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=4, image_size=32, val_size=5)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 32, 32) and y.dtype == torch.int64
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 1, 32, 32) and len(dm.val_set) == 5
    assert np.isclose(float(x.min()), -1.0)


def test_resnet_judge_trainer_augments_exports_and_registers(tmp_path):
    """arch="resnet" with flip / crop / erasing: fit a few steps on a tiny IDX folder, export, register the JSON
    as a preset, build it through NetworkSpec and extract features with ClassifierFeatures."""
    import json

    from export_weights import export

    from tailgen.metrics.features import ClassifierFeatures
    from tailgen.models.presets import PRESETS, register_shipped_weights
    from tailgen.models.resnet import ResNetClassifier
    from tailgen.models.spec import NetworkSpec
    from test_data_fashion import _tiny_folder

    torch.manual_seed(0)
    _tiny_folder(tmp_path, n=16, prefix="train")
    _tiny_folder(tmp_path, n=8, prefix="t10k")
    flags = {"in_channels": 1, "num_classes": 10, "widths": [8, 16], "blocks": [1, 1], "image_size": 28}
    m = ClassifierTrainer(flags, arch="resnet", noised=False, random_flip=True, random_crop=2, random_erasing=0.5,
                          label_smoothing=0.1, ema_decay=0.9, channels_last=True)
    assert isinstance(m.net, ResNetClassifier)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    assert m.augment_batch(x).shape == x.shape and not torch.equal(m.augment_batch(x), x)
    trainer = _fit(m, FashionMNISTDataModule(root=str(tmp_path), batch_size=8, val_size=8), tmp_path, steps=2)
    ckpt = tmp_path / "judge.ckpt"
    trainer.save_checkpoint(ckpt)
    pt, js = export(ckpt, "judge_test", tmp_path / "w")
    assert json.loads(js.read_text())["arch"] == "resnet"
    try:
        assert register_shipped_weights(tmp_path / "w") == ["judge_test"]
        net = NetworkSpec("judge_test").build()
        assert isinstance(net, ResNetClassifier) and not net.training
        feats = ClassifierFeatures(net, timestep=0)(torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8))
        assert feats["pool"].shape == (5, 16) and feats["logits"].shape == (5, 10)
        xs = torch.rand(5, 1, 28, 28) * 2 - 1
        torch.testing.assert_close(net(xs), m.ema.float().eval()(xs), atol=2e-2, rtol=2e-2)
    finally:
        PRESETS.pop("judge_test", None)
