"""Operators on J: forward + backward of logdet_gram, the column estimators and orthogonality."""
import torch

from fastjac.bench import suites, timing
from fastjac.bench import workloads as W

from . import DEVICES

SHAPES = {f"{B}x{D}x{d}": (B, D, d) for B, D, d in
          suites.CPU.operator_shapes + (suites.CUDA.operator_shapes if "cuda" in DEVICES else ())}


def _shape(device, shape):
    B, D, d = SHAPES[shape]
    table = suites.CUDA if device == "cuda" else suites.CPU
    if (B, D, d) not in table.operator_shapes:
        raise NotImplementedError(f"shape {shape} is not benchmarked on {device}")
    return dict(B=B, D=D, d=d)


class Operators:
    params = (list(W.OPERATORS), list(W.OPERATOR_IMPLEMENTATIONS), DEVICES, list(SHAPES))
    param_names = ["operator", "implementation", "device", "shape"]

    def setup(self, op, implementation, device, shape):
        self.work = W.operator(op, implementation, device=device, **_shape(device, shape))

    def time_forward_backward(self, *params):
        self.work.run()

    def peakmem_forward_backward(self, *params):
        self.work.run()


if torch.cuda.is_available():
    class OperatorsOnCard:
        """GPU memory, achieved bandwidth and the fraction of the measured floor reached."""
        params = (list(W.OPERATORS), list(W.OPERATOR_IMPLEMENTATIONS), list(SHAPES))
        param_names = ["operator", "implementation", "shape"]

        def setup_cache(self):
            return timing.measure_peaks(torch.device("cuda"))

        def setup(self, peaks, op, implementation, shape):
            self.work = W.operator(op, implementation, device="cuda", **_shape("cuda", shape))
            self.seconds = timing.median(timing.interleaved({"op": self.work.run}, repeats=10)["op"])

        def track_peak_memory(self, peaks, *params):
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
