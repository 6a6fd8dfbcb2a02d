"""Measure training throughput (images/s) of DiffusionTrainer / ClassifierTrainer configurations on this CPU.

    python tools/bench_train.py --kind model --flags '{"num_channels": 32, "num_res_blocks": 1}' \
        --threads 1 --batch 64 --steps 6 [--bf16] [--channels_last]

Times full optimisation steps (forward, IDDPM hybrid loss / cross-entropy, backward, AdamW, EMA update) on
random 28x28 Fashion-shaped data, after 2 warm-up steps. Prints one line per configuration.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tailgen.module.train import ClassifierTrainer, DiffusionTrainer

BASE_MODEL = dict(image_size=28, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                  attention_resolutions="7", num_head_channels=32, learn_sigma=True, class_cond=True,
                  num_classes=11, use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True)
BASE_CLF = dict(image_size=28, in_channels=1, num_classes=10, classifier_width=32, classifier_depth=1,
                classifier_channel_mult="1,2,2", classifier_attention_resolutions="7", classifier_pool="attention",
                classifier_num_head_channels=32)
DIFFUSION = dict(diffusion_steps=1000, noise_schedule="cosine", learn_sigma=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["model", "classifier"], default="model")
    ap.add_argument("--flags", default="{}", help="JSON overrides of the network flags")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--bf16", action="store_true", help="torch.autocast(cpu, bfloat16)")
    ap.add_argument("--channels_last", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.kind == "model":
        m = DiffusionTrainer({**BASE_MODEL, **json.loads(a.flags)}, DIFFUSION, channels_last=a.channels_last)
    else:
        m = ClassifierTrainer({**BASE_CLF, **json.loads(a.flags)}, DIFFUSION, channels_last=a.channels_last)
    opt = torch.optim.AdamW(m.net.parameters(), lr=1e-4)
    x = torch.rand(a.batch, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 10, (a.batch,))
    times = []
    for s in range(a.steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            loss = m.training_step((x, y), s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m.on_train_batch_end(None, None, s)
        times.append(time.perf_counter() - t0)
    dt = sum(times[2:]) / a.steps
    params = sum(p.numel() for p in m.net.parameters())
    print(f"{a.kind} flags={a.flags} params={params / 1e6:.2f}M batch={a.batch} threads={a.threads} "
          f"bf16={a.bf16} channels_last={a.channels_last}: {dt:.3f} s/step, {a.batch / dt:.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
