"""Decoder Jacobian columns (all d, or k = 1 drawn per sample), forward + backward into the decoder."""
from fastjac.bench import suites
from fastjac.bench import workloads as W

from . import DEVICES

MODELS = list(dict.fromkeys([*suites.CPU.models, *(suites.CUDA.models if "cuda" in DEVICES else ())]))


def sizes(model, device, implementation):
    table = (suites.CUDA if device == "cuda" else suites.CPU).models
    if model not in table:
        raise NotImplementedError(f"model {model} is not benchmarked on {device}")
    if implementation == "functional.jacobian":  # reverse mode, one sample at a time: seconds a sample
        if model not in ("mlp", "mlp_fused"):
            raise NotImplementedError("per-sample reverse mode takes minutes per call on the conv models")
        return dict(table[model], B=4)
    return table[model]


class JacobianColumns:
    params = (MODELS, list(W.JACOBIAN_IMPLEMENTATIONS), ["1", "all"], DEVICES)
    param_names = ["model", "implementation", "columns", "device"]

    def setup(self, model, implementation, columns, device):
        kw = dict(sizes(model, device, implementation))
        k = kw["d"] if columns == "all" else int(columns)
        self.work = W.jacobian(model, implementation, device=device, k=k, **kw)

    def time_columns(self, *params):
        self.work.run()

    def peakmem_columns(self, *params):
        self.work.run()
