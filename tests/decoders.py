"""Small float64 decoders for tests: an MLP and a conv-transpose decoder with eval-mode BatchNorm
and image output (B, C, H, W), shaped like App. D's MNIST decoder at toy width."""
import torch
from torch import nn


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
    """(B, D, d) by per-sample reverse-mode autograd.functional.jacobian — the slow, obvious way."""
    rows = []
    for i in range(z.shape[0]):
        Ji = torch.autograd.functional.jacobian(lambda zi: decoder(zi[None]).reshape(-1), z[i],
                                                create_graph=create_graph, vectorize=True)
        rows.append(Ji)
    return torch.stack(rows)
