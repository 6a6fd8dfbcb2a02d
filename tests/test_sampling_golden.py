"""Samplers reproduce guided-diffusion's trajectories step by step (fixtures README 4, 5, 7.4).

Every intermediate x_t of every recorded run is compared, with the recorded noise replayed exactly."""

import pytest
import torch

from conftest import FIXTURES
from tailgen.diffusion import ADMDenoiser, DiffusionProcess, NoisyClassifier, ReplayNoise
from tailgen.guidance import GradientGuidance
from tailgen.models.adm import create_classifier, create_model, create_superres_model
from tailgen.sampling import SamplingRun, sample

ATOL = 1e-4  # README 6: trajectories differ by up to 2.7e-5 between thread counts


class ADMClassifierGuidance(GradientGuidance):
    """ADM cond_fn: scale * grad_x log p(y | x_t, t) (mean form on DDPM, score form on DDIM)."""

    uses_classifier = True

    def direction(self, ctx):
        return ctx.classifier_eval().grad_log_p_y


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def golden():
    return torch.load(FIXTURES / "golden_sampling.pt")


@pytest.fixture(scope="module")
def nets():
    info = torch.load(FIXTURES / "golden_io.pt")["info"]
    unet = create_model(**info["unet_config"])
    unet.load_state_dict(torch.load(FIXTURES / "tiny_unet32.pt"))
    config = dict(info["classifier_config"])
    channel_mult = tuple(config.pop("channel_mult"))
    clf = create_classifier(**config, classifier_channel_mult=channel_mult)
    clf.load_state_dict(torch.load(FIXTURES / "tiny_classifier32.pt"))
    return info["unet_config"], unet.eval(), clf.eval()


def _record():
    steps = []
    return steps, lambda d: steps.append(d["x"].clone())


@pytest.mark.parametrize("run_key", ["ddpm10_unguided", "ddpm10_guided", "ddim10_eta0_guided", "ddim10_eta0.5_guided"])
def test_golden_trajectory(golden, nets, run_key):
    flags, unet, clf = nets
    run = golden["runs"][run_key]
    # One pasted guided-diffusion flag dict (model + diffusion flags) builds the process
    process = DiffusionProcess.from_flags(**{**flags, "timestep_respacing": run["timestep_respacing"]})
    assert process.timestep_map.tolist() == run["timestep_map"].tolist()
    torch.testing.assert_close(torch.from_numpy(process.alphas_cumprod), run["alphas_cumprod"], atol=0, rtol=0)

    seen_t = []
    denoiser = ADMDenoiser(unet, process)
    net_call = denoiser.net
    denoiser.net = lambda x, t, **kw: (seen_t.append(t.clone()), net_call(x, t, **kw))[1]
    noise = ReplayNoise(golden["noise_init"], golden["step_noises"])
    steps, callback = _record()
    name = "ddpm" if run["sampler"] == "p_sample_loop" else "ddim"
    sampling = SamplingRun(
        denoiser, guidance=[ADMClassifierGuidance(scale=run["classifier_scale"])] if run["guided"] else None,
        noisy_classifier=NoisyClassifier(clf, process), noise=noise, clip_denoised=run["clip_denoised"],
        callback=callback)
    final = sample(name, sampling, noise.initial(golden["shape"]), process, golden["y"],
                   **({"eta": run["eta"]} if name == "ddim" else {}))
    # The network saw the original int64 timesteps, one draw was consumed per step
    assert [t.tolist() for t in seen_t] == [[t, t] for t in run["model_timesteps_per_step"].tolist()]
    assert all(t.dtype == torch.int64 for t in seen_t)
    assert noise.remaining == 0
    errors = [(x - ref).abs().max().item() for x, ref in zip(steps, run["x_seq"])]
    assert len(errors) == 10 and max(errors) < ATOL, errors
    torch.testing.assert_close(final, run["final"], atol=ATOL, rtol=0)


def test_golden_upsampler_trajectory():
    golden = torch.load(FIXTURES / "golden_upsampler_sampling.pt")
    info = golden["info"]
    run = golden["runs"]["ddpm10_unguided"]
    net = create_superres_model(**info["sr_config"], channel_mult=tuple(info["channel_mult"]))
    net.load_state_dict(torch.load(FIXTURES / "tiny_upsampler32.pt"))
    process = DiffusionProcess.from_flags(**{**info["sr_config"], "timestep_respacing": run["timestep_respacing"]})
    noise = ReplayNoise(golden["noise_init"], golden["step_noises"])
    steps, callback = _record()
    with torch.no_grad():
        sampling = SamplingRun(ADMDenoiser(net.eval(), process), noise=noise,
                               model_kwargs={"low_res": golden["low_res"]}, callback=callback)
        final = sample("ddpm", sampling, noise.initial(golden["shape"]), process, golden["y"])
    errors = [(x - ref).abs().max().item() for x, ref in zip(steps, run["x_seq"])]
    assert len(errors) == 10 and max(errors) < ATOL, errors
    torch.testing.assert_close(final, run["final"], atol=ATOL, rtol=0)
