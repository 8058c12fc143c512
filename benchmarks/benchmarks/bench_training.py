"""One Adam step: plain AE, β-VAE, GRAE≈ (k = 1, 4), exact GRAE (whole and chunked), Hutchinson–CG."""
from fastjac.bench import workloads as W

from .bench_jacobian import sizes


class TrainingStep:
    params = (["mlp", "mlp_fused", "mnist", "celeba"], list(W.OBJECTIVES), list(W.TRAINING_IMPLEMENTATIONS), ["cpu", "cuda"])
    param_names = ["model", "objective", "implementation", "device"]

    def setup(self, model, objective, implementation, device):
        kw = sizes(model, device, implementation)
        self.work = W.training_step(model, objective, implementation, device=device, **kw)

    def time_step(self, *params):
        self.work.run()

    def peakmem_step(self, *params):
        self.work.run()


class TrainingStepOnCard:
    params = (["mnist", "celeba"], list(W.OBJECTIVES), list(W.TRAINING_IMPLEMENTATIONS))
    param_names = ["model", "objective", "implementation"]

    def setup(self, model, objective, implementation):
        kw = sizes(model, "cuda", implementation)
        self.work = W.training_step(model, objective, implementation, device="cuda", **kw)

    def track_peak_memory(self, *params):
        import torch
        torch.cuda.reset_peak_memory_stats()
        self.work.run()
        return torch.cuda.max_memory_allocated()
    track_peak_memory.unit = "bytes"
