"""Small float64 decoders for tests: an MLP and a conv-transpose decoder with eval-mode BatchNorm
and image output (B, C, H, W), shaped like App. D's MNIST decoder at toy width."""
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class ConvDecoder(nn.Module):
    def __init__(self, d, width=4, base=2):
        super().__init__()
        self.width, self.base = width, base  # output (B, 1, 4·base, 4·base); App. D MNIST has base 7
        self.fc = nn.Linear(d, width * 2 * base * base)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.BatchNorm2d(width), nn.ELU(),
            nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1), nn.Sigmoid())

    def forward(self, z):
        return self.net(self.fc(z).reshape(-1, 2 * self.width, self.base, self.base))


def conv_decoder(d, seed=0):
    torch.manual_seed(seed)
    dec = ConvDecoder(d).double()
    with torch.no_grad():  # non-trivial running statistics, then freeze them
        bn = dec.net[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return dec.eval()


def brute_jacobian(decoder, z, create_graph=False):
    """(B, D, d) by per-sample reverse-mode autograd.functional.jacobian — the slow, obvious way.
    z may be (B, *latent_shape); d = prod(latent_shape). Some torch backward formulas have no
    batching rule (group_norm's double backward): then one output row at a time. Attention runs
    torch's own math kernel (the CPU flash kernel has no double backward)."""
    with sdpa_kernel(SDPBackend.MATH):
        return _brute_jacobian(decoder, z, create_graph)


def _brute_jacobian(decoder, z, create_graph):
    rows = []
    for i in range(z.shape[0]):
        def row(zi):
            return decoder(zi.reshape(1, *z.shape[1:])).reshape(-1)
        try:
            Ji = torch.autograd.functional.jacobian(row, z[i].reshape(-1), create_graph=create_graph,
                                                    vectorize=True)
        except RuntimeError:
            Ji = torch.autograd.functional.jacobian(row, z[i].reshape(-1), create_graph=create_graph)
        rows.append(Ji)
    return torch.stack(rows)
