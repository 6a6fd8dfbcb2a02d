import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tailgen.module.datamodules import FashionMNISTDataModule, ToyDataModule
from tailgen.module.train import ClassifierTrainer, DiffusionTrainer, ema_state_dict
from tailgen.utils import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


pytestmark = pytest.mark.usefixtures("one_thread")

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


# ------------------------------------------------------------------------------------------------ the adapter path

REPO = Path(__file__).resolve().parents[1]


def _config_args(name: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "configs" / "fashion" / name).read_text())["model"]["init_args"]


def _old_vlb(p, x0, x_t, i, eps_detached, v):
    """process.vlb_term as it was before training went through the adapter (eps and raw v in)."""
    import math

    from tailgen.diffusion.process import discretized_gaussian_log_likelihood, normal_kl

    true_mean, true_log_var = p.posterior_mean(x0, x_t, i), p.posterior_log_variance(i, x_t)
    mean = p.posterior_mean(p.x0_from_eps(x_t, i, eps_detached), x_t, i)
    log_var = p.model_log_variance(i, v, x_t)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / math.log(2.0)
    return torch.where(i == 0, nll, kl)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
def test_fashion_diffusion_loss_through_adapter_equals_old_computation(bf16):
    """The shipped fashion training config: loss terms and gradients through ADMDenoiser are bit-identical to
    the old inline computation (raw t, channels-last input, learned-sigma channels sliced by hand), also under
    Lightning's bf16-mixed autocast."""
    torch.manual_seed(0)
    m = DiffusionTrainer(**_config_args("train_diffusion.yaml"))
    p, c = m.process, 1
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    y, t, noise = torch.tensor([1, 10, 4, 7]), torch.tensor([0, 1, 417, 999]), torch.randn(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        new = m.losses(m.net, x0, y, t, noise)
        grads_new = torch.autograd.grad(new["loss"].sum(), list(m.net.parameters()))
        x_t = p.q_sample(x0, t, noise)
        out = m.net(x_t.contiguous(memory_format=torch.channels_last), t, y).float()
        eps, v = out[:, :c], out[:, c:]
        vb = _old_vlb(p, x0, x_t, t, eps.detach(), v)
        mse = (eps - noise).pow(2).flatten(1).mean(1)
        old = {"mse": mse, "vb": vb, "loss": mse + m.vlb_weight * vb}
        grads_old = torch.autograd.grad(old["loss"].sum(), list(m.net.parameters()))
    for k in ("mse", "vb", "loss"):
        assert torch.equal(new[k], old[k]), k
    assert all(torch.equal(a, b) for a, b in zip(grads_new, grads_old))


def test_fashion_noisy_classifier_loss_through_adapter_equals_old_computation():
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = ClassifierTrainer(**_config_args("train_noisy_classifier.yaml"))
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    y, t, noise = torch.tensor([1, 0, 4, 9]), torch.tensor([0, 1, 417, 999]), torch.randn(4, 1, 28, 28)
    logits = m._logits(m.net, x0, t, noise)
    x_t = m.process.q_sample(x0, t, noise)
    old = m.net(x_t.contiguous(memory_format=torch.channels_last), t).float()
    assert torch.equal(logits, old)
    from tailgen.diffusion.losses import entropy_constrained_loss

    assert torch.equal(entropy_constrained_loss(logits, y, 0.0, m.label_smoothing)["loss"],
                       F.cross_entropy(old, y, label_smoothing=m.label_smoothing))


class OracleNet(torch.nn.Module):
    """Outputs ``target`` (plus a constant variance channel v when learned sigma) and records the timesteps."""

    def __init__(self, v: float | None = None):
        super().__init__()
        self.v, self.target, self.seen = v, None, []

    def forward(self, x, timesteps, y=None):
        self.seen.append(timesteps)
        out = self.target.to(x.dtype)
        return out if self.v is None else torch.cat([out, torch.full_like(out, self.v)], 1)


def test_rescale_timesteps_networks_receive_rescaled_float_t():
    """rescale_timesteps: the diffusion network and the noisy classifier get t * 1000 / N as float (the
    sampler's input), not the raw index."""
    diffusion = dict(diffusion_steps=100, noise_schedule="linear", rescale_timesteps=True)
    t = torch.tensor([0, 7, 50, 99])
    x0, noise = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    m = DiffusionTrainer({"width": 8, "depth": 1}, diffusion, arch="toy_mlp", num_classes=3, ema_decay=0)
    oracle = OracleNet()
    oracle.target = noise
    terms = m.losses(oracle, x0, torch.zeros(4, dtype=torch.long), t, noise)
    (seen,) = oracle.seen
    assert seen.dtype == torch.float32 and torch.equal(seen, t.float() * 10.0)
    assert torch.equal(terms["mse"], torch.zeros(4))  # the exact eps costs nothing
    c = ClassifierTrainer({"width": 8, "depth": 1}, diffusion, arch="toy_mlp", ema_decay=0)
    oracle = OracleNet()
    oracle.target = torch.zeros(4, 3)
    c._logits(oracle, x0, t, noise)
    assert torch.equal(oracle.seen[0], t.float() * 10.0)
    m = DiffusionTrainer({"width": 8, "depth": 1}, {**diffusion, "rescale_timesteps": False}, arch="toy_mlp",
                         num_classes=3, ema_decay=0)
    oracle = OracleNet()
    oracle.target = noise
    m.losses(oracle, x0, torch.zeros(4, dtype=torch.long), t, noise)
    assert oracle.seen[0].dtype == torch.int64 and torch.equal(oracle.seen[0], t)


@pytest.mark.parametrize("predict_xstart", [False, True], ids=["eps", "xstart"])
def test_learned_sigma_targets_follow_the_parameterisation(predict_xstart):
    """An oracle network (outputs the exact target of its parameterisation: x0 for predict_xstart, else eps;
    v = -1, i.e. Sigma = posterior variance) has L_simple = 0 and L_vlb = KL(q || q) = 0 for t > 0. The old
    trainer regressed the x0 output on eps (mse = mean (x0 - eps)^2) and built the mean from it as eps."""
    diffusion = dict(diffusion_steps=1000, noise_schedule="cosine", learn_sigma=True, predict_xstart=predict_xstart)
    m = DiffusionTrainer({"width": 8, "depth": 1, "learn_sigma": True}, diffusion, arch="toy_mlp", num_classes=3,
                         ema_decay=0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (4, 1, 8, 8), generator=g).float() / 127.5 - 1
    noise = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([1, 10, 500, 999])
    oracle = OracleNet(v=-1.0)
    oracle.target = x0 if predict_xstart else noise
    terms = m.losses(oracle, x0, torch.zeros(4, dtype=torch.long), t, noise)
    assert terms["mse"].abs().max() < 1e-10
    assert terms["vb"].abs().max() < 1e-3
    # a wrong output costs: with predict_xstart the MSE is on x0, closed form mean (x0_out - x0)^2
    oracle.target = torch.zeros_like(x0)
    terms = m.losses(oracle, x0, torch.zeros(4, dtype=torch.long), t, noise)
    expected = (x0 if predict_xstart else noise).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(terms["mse"], expected)


def test_speed_options_keep_the_checkpoint_layout_and_the_loss():
    """autocast bf16 + channels_last + sdpa attention: same state-dict keys as the plain trainer, loss within bf16
    tolerance of float32; compile wraps only the trained network; a bad autocast value fails at construction."""
    diffusion = dict(diffusion_steps=1000, noise_schedule="cosine", learn_sigma=True)
    torch.manual_seed(0)
    plain = DiffusionTrainer(ADM_TINY, diffusion, num_classes=10, ema_decay=0.9)
    torch.manual_seed(0)
    fast = DiffusionTrainer(ADM_TINY, diffusion, num_classes=10, ema_decay=0.9, autocast="bf16",
                            channels_last=True, attention="sdpa")
    assert list(plain.state_dict()) == list(fast.state_dict())
    assert all(mod.use_sdpa is True for mod in fast.net.modules() if hasattr(mod, "use_sdpa"))
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    y, t, noise = torch.tensor([1, 10, 4, 7]), torch.tensor([3, 100, 417, 900]), torch.randn(4, 1, 28, 28)
    a, b = plain.losses(plain.net, x0, y, t, noise), fast.losses(fast.net, x0, y, t, noise)
    assert b["loss"].dtype == torch.float32
    torch.testing.assert_close(b["mse"], a["mse"], rtol=0.05, atol=0.02)
    compiled = ClassifierTrainer({"width": 8, "depth": 1}, TOY_DIFF, arch="toy_mlp", ema_decay=0.9, compile=True)
    assert isinstance(compiled.network_call(compiled.net).call, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.network_call(compiled.ema).call is compiled.ema
    with pytest.raises(ConfigError, match="autocast"):
        ClassifierTrainer({"width": 8, "depth": 1}, TOY_DIFF, arch="toy_mlp", autocast="bf8")


# ------------------------------------------------------------------------------------------------ ECT


def test_entropy_constrained_loss_by_hand():
    """C = 2, logits (ln 3, 0) -> p = (3/4, 1/4), label 0; logits (0, 0) -> uniform, label 1.
    CE = (-ln 3/4 + ln 2) / 2 = 0.4904146; gap = log C - H: (ln 2 + 3/4 ln 3/4 + 1/4 ln 1/4, 0), mean 0.0654060;
    L = CE + 0.1 gap = 0.4969552. d gap / d z_k = p_k (ln p_k - sum_j p_j ln p_j): for z_0 of the first sample
    0.75 (ln 0.75 + 0.5623351) = 0.2059880, so dL/dz_0 = (p_0 - 1 + 0.1 * 0.2059880) / 2 = -0.1147006."""
    import math

    from tailgen.diffusion.losses import entropy_constrained_loss

    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1])
    terms = entropy_constrained_loss(logits, y, ect_lambda=0.1)
    assert abs(terms["ce"].item() - 0.4904146) < 1e-6
    assert abs(terms["entropy_gap"].item() - 0.0654060) < 1e-6
    assert abs(terms["loss"].item() - 0.4969552) < 1e-6
    terms["loss"].backward()
    assert abs(logits.grad[0, 0].item() - (-0.1147006)) < 1e-6
    plain = entropy_constrained_loss(logits.detach(), y, ect_lambda=0.0)
    assert plain["loss"].item() == terms["ce"].item()


def test_ect_classifier_trainer_option(tmp_path):
    """ect_lambda reaches the training loss (CE + lambda gap, logged) and is validated."""
    torch.manual_seed(0)
    m = ClassifierTrainer({"width": 16, "depth": 1}, TOY_DIFF, arch="toy_mlp", noised=True, ema_decay=0,
                          ect_lambda=0.1)
    _fit(m, ToyDataModule(num_samples=128, batch_size=128, val_samples=128), tmp_path, steps=1)  # one epoch + val
    metrics = m.trainer.callback_metrics
    torch.testing.assert_close(metrics["train/loss"], metrics["train/ce"] + 0.1 * metrics["train/entropy_gap"])
    assert 0 < float(metrics["val/entropy_t500"]) <= 1
    with pytest.raises(ConfigError, match="ect_lambda"):
        ClassifierTrainer({"width": 16, "depth": 1}, TOY_DIFF, arch="toy_mlp", ect_lambda=-0.1)
