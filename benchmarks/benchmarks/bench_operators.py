"""Operators on J: forward + backward of logdet_gram, the column estimators and orthogonality."""
from fastjac.bench import suites, timing
from fastjac.bench import workloads as W

SHAPES = {"64x784x16": (64, 784, 16), "64x12288x128": (64, 12288, 128)}


def _shape(device, shape):
    B, D, d = SHAPES[shape]
    if device == "cpu" and (B, D, d) not in suites.CPU.operator_shapes:
        raise NotImplementedError(f"shape {shape} is benchmarked on GPUs only")
    return dict(B=B, D=D, d=d)


class Operators:
    params = (list(W.OPERATORS), list(W.OPERATOR_IMPLEMENTATIONS), ["cpu", "cuda"], list(SHAPES))
    param_names = ["operator", "implementation", "device", "shape"]

    def setup(self, op, implementation, device, shape):
        self.work = W.operator(op, implementation, device=device, **_shape(device, shape))

    def time_forward_backward(self, *params):
        self.work.run()

    def peakmem_forward_backward(self, *params):
        self.work.run()


class OperatorsOnCard:
    """GPU memory, achieved bandwidth and the fraction of the measured floor reached."""
    params = (list(W.OPERATORS), list(W.OPERATOR_IMPLEMENTATIONS), list(SHAPES))
    param_names = ["operator", "implementation", "shape"]

    def setup_cache(self):
        import torch
        return timing.measure_peaks(torch.device("cuda")) if torch.cuda.is_available() else None

    def setup(self, peaks, op, implementation, shape):
        self.work = W.operator(op, implementation, device="cuda", **_shape("cuda", shape))
        self.seconds = timing.median(timing.interleaved({"op": self.work.run}, repeats=10)["op"])
        self.peaks = peaks

    def track_peak_memory(self, peaks, *params):
        import torch
        torch.cuda.reset_peak_memory_stats()
        self.work.run()
        return torch.cuda.max_memory_allocated()
    track_peak_memory.unit = "bytes"

    def track_bandwidth(self, peaks, *params):
        return self.work.bytes / self.seconds / 1e9
    track_bandwidth.unit = "GB/s"

    def track_fraction_of_floor(self, peaks, *params):
        floor = max(self.work.bytes / peaks.bandwidth, self.work.flops / peaks.flops)
        return floor / self.seconds
    track_fraction_of_floor.unit = "fraction"
