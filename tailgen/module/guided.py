"""``GuidedDiffusion``: the LightningModule that wraps a frozen diffusion model (and optionally a noisy
classifier and an unconditional model) and runs the guided sampler in ``predict_step`` / ``test_step``.

Lightning handles devices, DDP and precision; everything below this file is plain PyTorch.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import numpy as np
import torch
from torch import Tensor

from tailgen.data.fashion_mnist import CLASS_NAMES as FASHION_CLASS_NAMES
from tailgen.diffusion.adapters import ADMDenoiser, NoisyClassifier
from tailgen.diffusion.noise import NoiseSource, SeededNoise
from tailgen.diffusion.process import DiffusionProcess
from tailgen.guidance import Guidance, GuidanceStack
from tailgen.guidance.stack import guidance_configs
from tailgen.models.spec import ExpertSpec, NetworkSpec, build_experts
from tailgen.models.speed import (check_channels_last, check_quantize, compiled_autocast, fast_network,
                                  no_donated_buffers, prepare_network, resolve_autocast, wants_channels_last)
from tailgen.models.unet import check_labels
from tailgen.module.evaluation import LABELLED_METRICS, GridSamples, Evaluation, as_floats, format_table, write_report
from tailgen.module.quantize import int8_network
from tailgen.module.run_folder import output_path
from tailgen.module.sampling_data import low_res_inputs, sample_seed
from tailgen.sampling import SAMPLERS, SamplingRun
from tailgen.sampling.sanity import SampleMonitor
from tailgen.utils import ConfigError
from tailgen.utils.images import from_uint8, save_png, to_uint8


NO_NETWORK = ("model.init_args.network is not set: sampling needs a diffusion network (preset / flags / "
              "checkpoint); to evaluate existing samples run `tailgen test` with --data.init_args.samples FILE.npz")
SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"]


def _image_size(spec: NetworkSpec) -> Optional[int]:
    """The resolution a network works at: ``image_size``, or an upsampler's output ``large_size``."""
    flags = spec.flags_resolved
    return flags.get("image_size", flags.get("large_size") if spec.kind == "upsampler" else None)


class GuidedDiffusion(L.LightningModule):
    """Guided sampling of a pretrained (class-conditional) diffusion model.

    Args:
        network: the diffusion UNet (preset / flags / checkpoint); its preset supplies the diffusion flags. Not
            needed (and not loaded: the CLI drops it) when ``tailgen test`` evaluates ``data.samples``. An
            upsampler (kind ``upsampler``, e.g. ``64_256_upsampler``) samples conditioned on the low-resolution
            images of ``data.low_res`` (a first stage's samples.npz), passed to the network as ``low_res``.
        classifier: noisy-image classifier p(y | x_t, t) for gradient guidances (ADM, low-density, ...), or a list
            of PPAP experts (``ExpertSpec``: a spec + ``t_range`` + ``fixed_t``), routed per sample by timestep
            (``models/experts.py``); every classifier-based guidance takes either.
        unconditional: a separate unconditional model for classifier-free guidance (e.g. 256x256_diffusion_uncond).
        diffusion: guided-diffusion diffusion flags overriding the network's (e.g. ``{timestep_respacing: "250"}``).
        sampler: ``ddpm`` (ancestral, learned or fixed variance), ``ddim`` (``eta``), ``dpmpp_2m`` (ODE) or
            ``dpmpp_2m_sde`` (stochastic, one call per step).
        eta: DDIM stochasticity (0 = deterministic).
        clip_denoised: clamp x0_hat to [-1, 1] at every step (guided-diffusion's default).
        guidances: named guidances, applied in the mapping's order; names make them addressable from the
            command line and sweeps: ``--model.guidances.<name>.init_args.scale=0.7``.
        num_classes: the real classes (labels 0..C-1); default: the preset's, else the network's label count
            (a network trained with label dropout has one more row, the null label).
        evaluation: what ``tailgen test`` measures (metrics, features, reference data).
        progress: show a progress bar over sampler steps.
        check_samples: refuse degenerate batches (saturated or constant images; ``sampling/sanity.py``), naming
            the guidance whose term dominated and the step. Non-finite values are always refused.
        autocast: run the networks under ``torch.autocast`` in ``bf16`` / ``fp16`` (outputs and all sampler
            arithmetic stay float32); ``auto`` (default): bf16 where the hardware has fast bf16 (AMX /
            AVX512-BF16 on CPU, a bf16 GPU), else float32; null: strict float32. Works in the Python API and
            beside Lightning's ``precision``. The default is measured: README "Speed options".
        autocast_classifier: also run the noisy classifier under ``autocast`` (its log-softmax and the gradient
            w.r.t. x_t stay float32 either way); default True (measured within seed noise, README).
        channels_last: NHWC network weights (faster convolutions on CPU with oneDNN and on GPU); ``auto``
            (default): NHWC for the networks that run under autocast, the standard layout in float32.
        attention: ``matmul`` (explicit float32 softmax), ``sdpa`` (``F.scaled_dot_product_attention``) or
            ``auto`` (SDPA off-CPU; on CPU SDPA for >= 1024 tokens, matmul below).
        compile: ``torch.compile`` the UNet(s) and classifier (the first batch pays the compile time). On CPU it
            runs float32: ``autocast: auto`` gives way, an explicit bf16 / fp16 is a ConfigError (inductor x CPU
            autocast gave non-finite outputs, ``models/speed.compiled_autocast``).
        quantize: ``int8``: the diffusion UNet's convolutions as int8 oneDNN kernels, CPU only (classifier and
            unconditional network stay float; not with ``autocast``; the int8 UNet is not compiled); calibrated
            at the first batch (``module/quantize.py``).
        calibration: calibration inputs for ``quantize`` (PTQ4DM time-step draws along the module's own
            sampling trajectories, 8 per trajectory).
    """

    def __init__(
        self,
        network: Optional[NetworkSpec] = None,
        classifier: Optional[Union[NetworkSpec, list[ExpertSpec]]] = None,
        unconditional: Optional[NetworkSpec] = None,
        diffusion: Optional[dict[str, Any]] = None,
        sampler: SamplerName = "ddpm",
        eta: float = 0.0,
        clip_denoised: bool = True,
        guidances: Optional[dict[str, Guidance]] = None,
        num_classes: Optional[int] = None,
        evaluation: Optional[Evaluation] = None,
        progress: bool = True,
        check_samples: bool = True,
        autocast: Optional[Literal["auto", "bf16", "fp16"]] = "auto",
        autocast_classifier: bool = True,
        channels_last: Union[bool, Literal["auto"]] = "auto",
        attention: Literal["auto", "matmul", "sdpa"] = "auto",
        compile: bool = False,
        quantize: Optional[Literal["int8"]] = None,
        calibration: int = 256,
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
        self.save_hyperparameters(ignore=["evaluation"])  # guidances included (hparams.yaml, W&B config)
        if any(isinstance(g, Guidance) for g in (guidances or {}).values()):  # Python API: objects, not config
            self.hparams["guidances"] = guidance_configs(guidances)
            self._hparams_initial["guidances"] = guidance_configs(guidances)  # what loggers record
        if network is None:  # evaluating existing samples only
            if classifier is not None or unconditional is not None or guidances:
                raise ConfigError(NO_NETWORK + " (guidances, model.init_args.classifier and "
                                  "model.init_args.unconditional act on a diffusion network)")
            self.process, self.net, self.classifier_net, self.uncond_net = None, None, None, None
            self.num_classes, self.class_names, self.image_shape = num_classes, None, None
            self.low_res_shape = None
        else:
            self._build_networks(network, classifier, unconditional, diffusion, num_classes)
        self.sampler, self.eta, self.clip_denoised, self.progress = sampler, eta, clip_denoised, progress
        self.check_samples = check_samples
        self.evaluation, self.suite = evaluation, None
        self.step_hook: Optional[Callable[[dict], None]] = None  # set by the CLI's SampleProgressBar
        self.guidances = dict(guidances or {})
        for name, guidance in self.guidances.items():
            if type(guidance) is Guidance:
                raise ConfigError(
                    f"model.init_args.guidances.{name} is the base class tailgen.guidance.Guidance, which has no hooks "
                    "(it would do nothing): give the class_path of a guidance (e.g. tailgen.guidance.ClassifierGuidance) "
                    "or of your own Guidance subclass (in a config file, check the guidance name for a typo)"
                )
        self.stack = GuidanceStack(self.guidances)
        self.stack.validate(sampler=sampler, has_classifier=self.classifier_net is not None,
                            has_uncond=self.uncond_net is not None)
        self.freeze()
        resolve_autocast(autocast, "cpu")  # a bad value fails here, not at the first batch
        check_quantize(quantize, calibration, autocast)
        check_channels_last(channels_last)
        self.quantize, self.calibration = quantize, calibration
        for net in (self.net, self.classifier_net, self.uncond_net):
            if net is not None:
                prepare_network(net, channels_last=channels_last is True, attention=attention)
        self.autocast, self.autocast_classifier, self.compile_networks = autocast, autocast_classifier, compile
        self.channels_last = channels_last
        self._fast: dict = {}  # (role, device type) -> the network's call with autocast / compile (not submodules)

    def _fast_call(self, role: str, net):
        """``net`` as called while sampling: under the autocast dtype of this device, compiled if asked."""
        key = (role, self.device.type)
        if key not in self._fast:
            dtype = resolve_autocast(self.autocast, self.device)
            if role == "classifier" and not self.autocast_classifier:
                dtype = None
            compile_net = self.compile_networks
            dtype = compiled_autocast(self.autocast, dtype, compile_net, self.device)
            if role == "network" and self.quantize is not None:  # calibrated now; runs eagerly (oneDNN int8)
                net, compile_net, dtype = int8_network(self), False, None
            elif wants_channels_last(self.channels_last, dtype):  # auto: NHWC under autocast (true: since init)
                net.to(memory_format=torch.channels_last)
            self._fast[key] = fast_network(net, autocast=dtype, compile=compile_net)
        return self._fast[key]

    def _build_networks(self, network: NetworkSpec, classifier: Optional[NetworkSpec | list[ExpertSpec]],
                        unconditional: Optional[NetworkSpec], diffusion: Optional[dict], num_classes: Optional[int]):
        """The diffusion process and the frozen networks (weights and resolutions checked before any load)."""
        diffusion = dict(diffusion or {})
        if isinstance(diffusion.get("timestep_respacing"), int):  # `--model.diffusion.timestep_respacing=250`
            diffusion["timestep_respacing"] = str(diffusion["timestep_respacing"])
        self.process = DiffusionProcess.from_flags(**{**network.diffusion_flags, **diffusion})
        experts = list(classifier) if isinstance(classifier, (list, tuple)) else (
            [classifier] if isinstance(classifier, ExpertSpec) else None)
        if experts is not None and self.process.rescale_timesteps:
            raise ConfigError("model.init_args.classifier: expert t_ranges are original timesteps; a process with "
                              "rescale_timesteps feeds rescaled ones: use one classifier")
        specs = {"network": network, "unconditional": unconditional}
        if experts is None:
            specs["classifier"] = classifier
        else:
            specs.update({f"classifier.{k}": spec for k, spec in enumerate(experts)})
        size = _image_size(network)
        for role, spec in specs.items():  # every network has weights and the model's resolution before any loads
            if spec is None:
                continue
            spec.check_weights(f"model.init_args.{role}")
            other = _image_size(spec)
            if size is not None and other is not None and other != size:
                raise ConfigError(
                    f"model.init_args.{role} is built for {other}x{other} images but the diffusion model "
                    f"(model.init_args.network) makes {size}x{size}: use a {role} of the same resolution "
                    f"(e.g. the {size}x{size}_classifier preset with {size}x{size}_diffusion)"
                )
        self.net = network.build(key="model.init_args.network")
        if experts is not None:  # PPAP experts: one module with the call signature of one classifier
            self.classifier_net = build_experts(experts, self.process.num_timesteps)
        else:
            self.classifier_net = classifier.build(key="model.init_args.classifier") if classifier is not None else None
        self.uncond_net = unconditional.build(key="model.init_args.unconditional") if unconditional is not None else None
        flags = network.flags_resolved
        class_cond = flags.get("class_cond", network.kind == "toy_denoiser")
        num_classes = num_classes or network.sampling.get("num_classes") or flags.get("num_classes", 1000)
        self.num_classes: Optional[int] = num_classes if class_cond else None
        preset = network.preset or ""
        # grid row labels: Fashion-MNIST's names for a fashion model's 10 classes, else the indices
        self.class_names: Optional[tuple[str, ...]] = (
            FASHION_CLASS_NAMES if self.num_classes == 10 and preset.startswith("fashion") else None)
        self.image_shape = ((flags.get("in_channels", 3), size, size) if size is not None
                            else (flags.get("in_dim", 2),))
        # an upsampler's low-resolution input (C, h, w), None for other networks
        self.low_res_shape: Optional[tuple[int, int, int]] = (
            (flags.get("in_channels", 3), flags["small_size"], flags["small_size"]) if network.kind == "upsampler" else None)

    # ------------------------------------------------------------------------------------------------ adapters

    def _denoiser(self) -> ADMDenoiser:
        return ADMDenoiser(self._fast_call("network", self.net), self.process)

    def _uncond(self) -> Optional[Callable]:
        if self.uncond_net is None:
            return None
        uncond = ADMDenoiser(self._fast_call("unconditional", self.uncond_net), self.process)
        return lambda x, i: uncond(x, i)

    def _noisy_classifier(self) -> Optional[NoisyClassifier]:
        if self.classifier_net is None:
            return None
        return NoisyClassifier(self._fast_call("classifier", self.classifier_net), self.process)

    @contextmanager
    def sampling_with(self, network: Callable) -> Iterator[None]:
        """Within the block ``sample`` calls ``network`` (e.g. a recorder of its inputs) as the diffusion UNet, all
        networks eager in float32 (no compile, autocast, int8), no progress display; all restored on exit (int8)."""
        saved = self._fast, self.step_hook, self.progress, self.compile_networks, self.autocast
        self._fast = {("network", self.device.type): network}  # a cache of its own for the block
        self.step_hook, self.progress, self.compile_networks, self.autocast = None, False, False, None
        try:
            yield
        finally:
            self._fast, self.step_hook, self.progress, self.compile_networks, self.autocast = saved

    # ------------------------------------------------------------------------------------------------ sampling

    def check_low_res(self, low_res: Optional[Tensor], n: Optional[int]) -> dict:
        """The network's extra inputs for ``n`` samples (``sampling_data.low_res_inputs``)."""
        return low_res_inputs(low_res, self.low_res_shape, n, self.device)

    def sample(self, labels: Optional[Tensor], seeds: Optional[Tensor] = None, *, noise: Optional[NoiseSource] = None,
               callback: Optional[Callable[[dict], None]] = None, low_res: Optional[Tensor] = None) -> Tensor:
        """Sample one image per label (one batch): noise from per-sample ``seeds`` (default: those of
        ``tailgen predict`` with data seed 0, ``sample_seed(0, k)``), or an explicit ``noise`` source (e.g.
        recorded noise to replay). An upsampler takes ``low_res`` (float N x C x h x w in [-1, 1]). Returns float
        NCHW in [-1, 1]."""
        if self.net is None:
            raise ConfigError(NO_NETWORK)
        if labels is not None and self.num_classes is not None:  # unconditional: labels only count the samples
            check_labels(labels, self.num_classes, fix="fix data.labels")  # the real classes, not a null label
        model_kwargs = self.check_low_res(low_res, len(labels) if labels is not None else
                                          len(seeds) if seeds is not None else None)
        # Lightning may run predict/test under inference mode: leave it, so guidance gradients work; no_donated_buffers:
        # a compiled classifier forward is differentiated once per objective (models/speed.py)
        with torch.inference_mode(False), torch.no_grad(), no_donated_buffers():
            labels = labels.clone() if labels is not None else None
            if noise is None:
                if seeds is None:
                    if labels is None:
                        raise ConfigError("sample() needs labels or seeds (how many samples to draw)")
                    seeds = torch.tensor([sample_seed(0, k) for k in range(len(labels))])
                noise = SeededNoise(seeds.tolist(), device=self.device)
            x = noise.initial((len(labels) if labels is not None else len(seeds), *self.image_shape))
            hook, steps = self.step_hook, self.process.num_steps
            if hook is not None:  # the run's progress bar shows the step: no step bar of our own
                callback = (lambda info, user=callback: (hook({**info, "num_steps": steps}),
                                                          user is not None and user(info)))
            monitor = SampleMonitor(self.stack, callback)
            run = SamplingRun(self._denoiser(), guidance=self.stack, noise=noise,
                              noisy_classifier=self._noisy_classifier(), uncond=self._uncond(),
                              model_kwargs=model_kwargs, clip_denoised=self.clip_denoised, callback=monitor,
                              progress=self.progress and hook is None)
            x = SAMPLERS[self.sampler](run, x.to(self.device), self.process,
                                       labels if self.num_classes is not None else None,
                                       **({"eta": self.eta} if self.sampler == "ddim" else {}))
            return monitor.check(x) if self.check_samples else x

    def generate(self, labels: Optional[Sequence[int] | Tensor] = None, seeds: Optional[Sequence[int] | Tensor] = None,
                 *, seed: int = 0, batch_size: int = 64, low_res: Optional[np.ndarray | Tensor] = None) -> Tensor:
        """Python API: images for ``labels`` without a Trainer, in batches of ``batch_size``.

        ``seeds`` (one per sample) default to ``sample_seed(seed, k)``, the seeds ``tailgen predict --data.seed
        SEED`` gives sample k, so the same labels give the same images as the command line. An unconditional
        model takes ``seeds`` alone (or labels, which then only count the samples). An upsampler takes ``low_res``:
        uint8 N x h x w x C, e.g. a first stage's ``generate`` output. Returns uint8 N x H x W x C
        (guided-diffusion's sample layout) on the CPU.
        """
        if labels is None and seeds is None:
            raise ConfigError("generate() needs labels (one per sample) or seeds")
        n = len(labels) if labels is not None else len(seeds)
        labels = torch.as_tensor(labels, dtype=torch.int64) if labels is not None else None
        seeds = (torch.as_tensor(seeds, dtype=torch.int64) if seeds is not None
                 else torch.tensor([sample_seed(seed, k) for k in range(n)], dtype=torch.int64))
        if len(seeds) != n:
            raise ConfigError(f"generate() got {n} labels but {len(seeds)} seeds: give one seed per sample")
        if labels is not None and self.num_classes is not None:  # unconditional: labels only count the samples
            check_labels(labels, self.num_classes, fix="fix data.labels")  # the real classes, not a null label
        if low_res is not None:
            low_res = torch.as_tensor(low_res)
            if low_res.dtype != torch.uint8 or low_res.dim() != 4:
                raise ConfigError(f"generate(low_res=...) takes uint8 N x h x w x C images (a first stage's samples), "
                                  f"got {low_res.dtype} {tuple(low_res.shape)}")
            low_res = from_uint8(low_res)
        self.check_low_res(low_res, n)
        was_training = self.training
        self.eval()
        try:
            chunks = [to_uint8(self.sample(None if labels is None else labels[k:k + batch_size].to(self.device),
                                           seeds[k:k + batch_size],
                                           low_res=None if low_res is None else low_res[k:k + batch_size])).cpu()
                      for k in range(0, n, batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(chunks)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> dict[str, Tensor]:
        images = self.sample(batch["label"], batch["seed"], low_res=batch.get("low_res"))
        return self._sampled(batch, to_uint8(images))

    @staticmethod
    def _sampled(batch: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        return {"images": images.cpu(), "labels": batch["label"].cpu(), "seeds": batch["seed"].cpu(),
                "indices": batch["index"].cpu()}

    # ------------------------------------------------------------------------------------------------ evaluation

    def setup(self, stage: str) -> None:
        dataset = getattr(getattr(self.trainer, "datamodule", None), "dataset", None) if self._trainer else None
        from_file = getattr(dataset, "image_shape", None) is not None  # an existing samples.npz
        if self.net is None and not (stage == "test" and from_file):
            raise ConfigError(NO_NETWORK)
        if stage == "test":
            if self.evaluation is None:
                raise ConfigError("tailgen test needs model.evaluation (metrics, features, reference): "
                                  "add e.g. --config configs/fashion/eval.yaml")
            self.metrics_path()  # every rank: the run folder is decided (and broadcast) now
            sample_shape = getattr(dataset, "image_shape", None)  # an existing samples.npz, else what we sample
            if sample_shape is None and len(self.image_shape) == 3:
                sample_shape = (self.image_shape[1], self.image_shape[2], self.image_shape[0])
            metrics = list(self.evaluation.metrics)
            if from_file and (dataset.labels < 0).all():
                dropped = [m for m in metrics if m in LABELLED_METRICS]
                metrics = [m for m in metrics if m not in LABELLED_METRICS]
                if dropped:
                    rank_zero_info(f"the samples have no labels (no arr_1): skipping {', '.join(dropped)}")
                if not metrics:
                    raise ConfigError(f"the samples file has no labels (arr_1) and every metric asked for "
                                      f"({', '.join(dropped)}) needs them: add fid / precision / recall / ...")
            elif self.net is None:
                self._classes_from(dataset)
            self.suite = self.evaluation.build_suite(self.num_classes, sample_shape=sample_shape, metrics=metrics)

    def _classes_from(self, dataset) -> None:
        """Without a diffusion network: num_classes from the judging classifier, else the samples' labels."""
        spec = self.evaluation.feature_network
        if self.num_classes is None:
            flags = spec.flags_resolved if spec is not None else {}
            self.num_classes = flags.get("num_classes") or int(dataset.labels.max()) + 1
        if self.num_classes == 10 and spec is not None and (spec.preset or "").startswith("fashion"):
            self.class_names = FASHION_CLASS_NAMES

    def metrics_path(self) -> Path:
        """Where ``tailgen test`` writes metrics.json: ``evaluation.output`` if absolute, else under this run's own
        folder (``module/run_folder.py``); grid.png, config.yaml and kept samples go beside it."""
        return output_path(self.trainer, self.evaluation.output)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> Optional[dict[str, Tensor]]:
        """Updates the metrics; returns the sampled batch (as predict_step) for the writer's
        ``evaluation.keep_samples``, nothing for images read from data.samples."""
        sampled = "images" not in batch
        images = (to_uint8(self.sample(batch["label"], batch["seed"], low_res=batch.get("low_res"))) if sampled
                  else batch["images"])
        labels = batch["label"] if (batch["label"] >= 0).all() else None
        self.suite.update(images.permute(0, 3, 1, 2), labels)
        self._grid_samples.add(images.cpu().numpy(), batch["label"].cpu().numpy())
        return self._sampled(batch, images) if sampled else None

    def on_test_epoch_start(self) -> None:
        self._grid_samples = GridSamples(self.class_names)

    def on_test_epoch_end(self) -> None:
        values = as_floats(self.suite.compute())  # synchronised across ranks: same values everywhere
        self.log_dict(values, sync_dist=False)
        if self.trainer.is_global_zero:
            out = self.metrics_path()
            write_report(values, out)
            grid = self._grid_samples.grid()
            if grid is not None:
                save_png(grid, out.parent / "grid.png")
                if self.logger is not None and hasattr(self.logger, "log_image"):
                    self.logger.log_image("test/grid", [grid], caption=["class-sorted samples"])
            print(f"\n{format_table(values)}\nmetrics written to {out}")
        self.suite.reset()
