"""Data-free distillation of PPAP experts (tailgen/module/distill.py): the KL loss is PPAP's, the experts start as
the teacher, only their LoRA factors train and each sample's gradient reaches its own expert only; `tailgen fit`
trains them on a generated samples.npz, the export gives plain classifier files the experts load from, and a bad
samples file is one error line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cli_processes import REPO, run_all
from test_data_fashion import _tiny_folder
from tailgen.models.experts import ClassifierExperts
from tailgen.models.lora import lora_parameters
from tailgen.models.spec import ExpertSpec, NetworkSpec, build_experts
from tailgen.module.datamodules import GeneratedSamplesDataModule
from tailgen.module.distill import ExpertDistillation, distillation_kl, merged_experts
from tailgen.utils import ConfigError, DataError

sys.path.insert(0, str(REPO / "tools"))
CONFIG = REPO / "configs" / "fashion" / "train_ppap_experts.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return ExpertDistillation(num_experts=2, rank=2, diffusion={"diffusion_steps": 1000, "noise_schedule": "cosine"})


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def randomise_updates(net, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(net):
            if p.abs().sum() == 0:  # B (zero at the start): make the update non-zero
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def test_kl_is_ppaps_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 10, generator=g), 3 * torch.randn(5, 10, generator=g)
    tau = 0.25
    s, t = student.double().numpy(), teacher.double().numpy()
    p = np.exp(t / tau) / np.exp(t / tau).sum(1, keepdims=True)
    log_q = s - np.log(np.exp(s).sum(1, keepdims=True))
    hand = (p * (np.log(p) - log_q)).sum(1)
    kl = distillation_kl(student, teacher, tau)
    np.testing.assert_allclose(kl.numpy(), hand, rtol=1e-4, atol=1e-5)
    batchmean = torch.nn.KLDivLoss(reduction="batchmean")(student.log_softmax(1), (teacher / tau).softmax(1))
    torch.testing.assert_close(kl.mean(), batchmean)  # PPAP's classifier_train.py loss
    assert distillation_kl(teacher / tau, teacher, tau).abs().max() < 1e-5  # zero when the student matches


def test_experts_start_as_the_teacher(module):
    assert isinstance(module.net, ClassifierExperts) and module.net.t_ranges == [(0, 500), (501, 999)]
    assert module.net.fixed_t == [0, 0]
    x = images(6)
    teacher = module.teacher_logits(x)
    for t in (0, 250, 500, 501, 999):  # one expert per batch: one plain call, bit for bit
        assert torch.equal(module.student_logits(x, torch.full((6,), t)), teacher)
    mixed = torch.tensor([3, 700, 500, 501, 0, 999])  # split and reassembled: same up to batch-size rounding
    torch.testing.assert_close(module.student_logits(x, mixed), teacher, rtol=0, atol=1e-5)
    terms = module.losses(x, torch.zeros(6, dtype=torch.long), torch.zeros_like(x))  # x_t = x0 at t = 0
    assert terms["agree"].all() and terms["kl"].min() >= 0


def test_stratified_timesteps(module):
    t = module.sample_timesteps(400, torch.Generator().manual_seed(0))
    which = module.net.expert_index(t)
    assert torch.equal(which, torch.arange(400) % 2)  # every expert gets half the batch
    assert t[which == 0].min() >= 0 and t[which == 0].max() <= 500 and t[which == 1].min() >= 501
    assert t.max() <= 999 and len(torch.unique(t)) > 200


def test_only_lora_factors_train_and_each_sample_reaches_its_expert(module):
    import copy

    m = copy.deepcopy(module)
    randomise_updates(m.net)
    lora = {id(p) for p in lora_parameters(m.net)}
    assert {id(p) for p in m.configure_optimizers()["optimizer"].param_groups[0]["params"]} == lora
    assert not any(p.requires_grad for p in m.teacher.parameters())
    x, t = images(4, seed=1), torch.tensor([10, 900, 400, 600])  # experts 0, 1, 0, 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    m.losses(x, t, noise)["kl"].mean().backward()
    with_grad = [p for p in m.parameters() if p.grad is not None]
    assert {id(p) for p in with_grad} == lora and all(p.grad.abs().sum() > 0 for p in with_grad)
    for sample, owner in ((0, 0), (1, 1)):  # the loss of one sample: gradient in its expert only
        m.zero_grad(set_to_none=True)
        m.losses(x, t, noise)["kl"][sample].backward()
        for k, expert in enumerate(m.net.experts):
            moved = any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(expert))
            assert moved == (k == owner), (sample, k)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="num_experts"):
        ExpertDistillation(num_experts=3, t_ranges=[[0, 499], [500, 999]])
    with pytest.raises(ConfigError, match="tau"):
        ExpertDistillation(tau=0.0)
    with pytest.raises(ConfigError, match="classifier"):
        ExpertDistillation(teacher={"preset": "fashion_diffusion"})
    with pytest.raises(ConfigError, match="teacher"):
        ExpertDistillation(teacher={"presett": "fashion_clean_classifier"})
    with pytest.raises(ConfigError, match="reference must be a classifier"):
        ExpertDistillation(reference={"preset": "fashion_diffusion"})


def _samples(path: Path, n: int = 8, channels: int = 1) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, rng.integers(0, 256, (n, 28, 28, channels), dtype=np.uint8), np.arange(n) % 10)
    return path


def test_generated_samples_datamodule(tmp_path):
    root = tmp_path / "idx"
    root.mkdir()
    _tiny_folder(root, n=6, prefix="t10k")
    dm = GeneratedSamplesDataModule(str(_samples(tmp_path / "s.npz")), root=str(root), batch_size=4, val_size=6)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 28, 28) and x.min() >= -1 and x.max() <= 1 and len(dm.train_set) == 8
    assert next(iter(dm.val_dataloader()))[1].tolist() == [0, 1, 2, 3]  # real labels for validation
    for path, words in ((tmp_path / "missing.npz", ["does not exist", "data.init_args.samples", "tailgen predict"]),
                        (_samples(tmp_path / "rgb.npz", channels=3), ["28x28x3", "grayscale"]),
                        (_samples(tmp_path / "few.npz", n=2), ["2 images", "batch"])):
        with pytest.raises(DataError) as error:
            GeneratedSamplesDataModule(str(path), root=str(root), batch_size=4).setup("fit")
        assert all(w in str(error.value) for w in words) and "\n" not in str(error.value)


def test_fit_export_and_load_as_experts(tmp_path, capsys):
    """`tailgen fit` with the shipped config: 3 steps on a tiny generated samples.npz (validation at step 2); the
    export merges each expert into a plain classifier file that build_experts and GuidedDiffusion load, computing
    the trained experts' logits; a missing samples file ends in one error line."""
    from export_weights import export

    root = tmp_path / "idx"
    root.mkdir()
    _tiny_folder(root, n=4, prefix="t10k")
    base = ["fit", "--config", str(CONFIG), f"--data.init_args.root={root}", "--data.init_args.batch_size=4",
            "--data.init_args.val_size=4", "--trainer.val_check_interval=2", "--trainer.max_steps=3",
            "--trainer.log_every_n_steps=1", "--model.init_args.reference=null"]
    runs = run_all({"fit": [*base, f"--data.init_args.samples={_samples(tmp_path / 'g.npz')}"],
                    "missing": [*base, "--data.init_args.samples=nope/samples.npz"]}, tmp_path)
    rc, out, err, folder = runs["fit"]
    assert rc == 0, err[-3000:]
    assert "val/acc_expert3=" in out and "val/teacher_acc_expert0=" in out
    rc, out, err, _ = runs["missing"]
    assert rc == 2 and err.strip().splitlines()[-1].startswith("tailgen: error: samples file nope/samples.npz")
    assert "Traceback" not in err and "data.init_args.samples" in err

    ckpt_path = folder / "runs" / "fashion_ppap_experts" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["expert_t_ranges"] == [[0, 250], [251, 500], [501, 750], [751, 999]]
    written = export(ckpt_path, "ppap", tmp_path / "w32", fp16=False)
    fragment = [e["init_args"] for e in
                yaml.safe_load((tmp_path / "w32" / "ppap.yaml").read_text())["model.init_args.classifier"]]
    assert [e["t_range"] for e in fragment] == ckpt["expert_t_ranges"] and {e["fixed_t"] for e in fragment} == {0}
    specs = [ExpertSpec(**entry) for entry in fragment]
    experts = build_experts(specs, 1000)
    trained, _, _ = merged_experts(ckpt)
    teacher = NetworkSpec("fashion_clean_classifier").build()
    x = images(4, seed=3)
    for k, (lo, hi) in enumerate(ckpt["expert_t_ranges"]):
        t = torch.full((4,), (lo + hi) // 2)
        torch.testing.assert_close(experts(x, t), trained[k](x, torch.zeros(4, dtype=torch.long)))
        assert not torch.allclose(experts(x, t), teacher(x, torch.zeros(4, dtype=torch.long)))  # it trained
    assert len(written) == 9  # 4 x (.pt, .json) + the fragment

    pt16, *_ = export(ckpt_path, "ppap", tmp_path / "w16")  # float16 storage: the clean classifier's size
    shipped = REPO / "tailgen" / "weights" / "fashion_clean_classifier.pt"
    assert abs(pt16.stat().st_size - shipped.stat().st_size) < 0.05 * shipped.stat().st_size
    from tailgen.module.guided import GuidedDiffusion

    frag16 = yaml.safe_load((tmp_path / "w16" / "ppap.yaml").read_text())["model.init_args.classifier"]
    model = GuidedDiffusion(NetworkSpec("fashion_diffusion"), classifier=[ExpertSpec(**e["init_args"]) for e in frag16],
                            diffusion={"timestep_respacing": "10"}, progress=False)
    assert isinstance(model.classifier_net, ClassifierExperts) and len(model.classifier_net.experts) == 4
    torch.testing.assert_close(model.classifier_net(x, torch.full((4, ), 100)),
                               trained[0](x, torch.zeros(4, dtype=torch.long)), atol=2e-2, rtol=2e-2)

    from tailgen.cli import main  # the fragment as a second --config over a method config (a NetworkSpec there)

    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(REPO / "configs/fashion/adm_g.yaml"),
              "--config", str(tmp_path / "w16" / "ppap.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["classifier"]
    assert [e["init_args"]["checkpoint"] for e in printed] == [e["init_args"]["checkpoint"] for e in frag16]
