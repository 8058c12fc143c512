"""Decoder-only training steps on the zoo's decoders: plain, fastjac GRAE≈ (k = 1, one pass) and the
hand-written torch.func step beside it (fastjac/bench/zoo.py). The ratios to the plain step are what
issue 14's targets are stated in: ``python -m fastjac.bench.zoo`` prints them from one run."""
import torch

from fastjac.bench import zoo


class ZooStep:
    params = (list(zoo.DECODERS), list(zoo.STEPS))
    param_names = ["decoder", "step"]
    timeout = 300

    def setup(self, decoder, step):
        torch.set_num_threads(1)
        built = zoo.DECODERS[decoder]()
        if built is None:
            raise NotImplementedError(f"{decoder} needs an optional package (pip install '.[zoo]')")
        module, z_shape, D = built
        z = torch.randn(*z_shape).requires_grad_()
        x = torch.rand(z_shape[0], D).reshape(module(z).shape)
        self.step = zoo.STEPS[step](module, z, x)
        self.step()  # warm-up

    def time_step(self, decoder, step):
        self.step()
