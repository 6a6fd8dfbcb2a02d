"""A guidance defined outside tailgen: YAML loads it with ``class_path: user_guidance.Sharpen``."""

import torch.nn.functional as F

from tailgen.guidance import Guidance
from tailgen.utils import ConfigError


class Sharpen(Guidance):
    """Unsharp mask on the predicted clean image (hook H4): x0_hat <- x0_hat + w (x0_hat - box_blur(x0_hat))."""

    def __init__(self, kernel: int = 3, scale: float = 0.2, t_max: float = 0.5, **kwargs):
        # own defaults for scale and t_max; t_min, every, schedule, start, stop arrive through **kwargs
        super().__init__(scale=scale, t_max=t_max, **kwargs)
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"Sharpen: kernel must be a positive odd integer, got {kernel}")
        self.kernel = kernel

    def guide_x0(self, ctx, x0, w):
        blur = F.avg_pool2d(x0, self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=False)
        return (x0 + w * (x0 - blur)).clamp(-1, 1)
