"""One Adam step: plain AE and β-VAE, and the GRAE family (GRAE≈ k = 1, 4, exact, exact chunked,
Hutchinson–CG) with the implementation as a parameter."""
import torch

from fastjac.bench import workloads as W

from . import DEVICES
from .bench_jacobian import MODELS, sizes

PLAIN = ["ae", "beta_vae"]
GRAE = [o for o in W.OBJECTIVES if o not in PLAIN]


class PlainStep:
    params = (MODELS, PLAIN, DEVICES)
    param_names = ["model", "objective", "device"]

    def setup(self, model, objective, device):
        self.work = W.training_step(model, objective, "torch", device=device, **sizes(model, device, "torch"))

    def time_step(self, *params):
        self.work.run()

    def peakmem_step(self, *params):
        self.work.run()


class GRAEStep:
    params = (MODELS, GRAE, list(W.TRAINING_IMPLEMENTATIONS), DEVICES)
    param_names = ["model", "objective", "implementation", "device"]

    def setup(self, model, objective, implementation, device):
        kw = sizes(model, device, implementation)
        self.work = W.training_step(model, objective, implementation, device=device, **kw)

    def time_step(self, *params):
        self.work.run()

    def peakmem_step(self, *params):
        self.work.run()


if torch.cuda.is_available():
    class StepMemoryOnCard:
        params = (MODELS, list(W.OBJECTIVES), list(W.TRAINING_IMPLEMENTATIONS))
        param_names = ["model", "objective", "implementation"]

        def setup(self, model, objective, implementation):
            kw = sizes(model, "cuda", implementation)
            self.work = W.training_step(model, objective, implementation, device="cuda", **kw)

        def track_peak_memory(self, *params):
            torch.cuda.reset_peak_memory_stats()
            self.work.run()
            return torch.cuda.max_memory_allocated()
        track_peak_memory.unit = "bytes"
