"""A toy UNet-shaped network and the three parameterizations, mirroring ComfyUI's formulas, for core tests."""
from __future__ import annotations

import math

import torch
from torch import nn

from selfperc_core import AdapterSwitch, FeatureTap

# --- parameterizations: (noise_scaling, input scaling, denoise) as ComfyUI's model_sampling defines them ---


def _s(sigma, x):
    return sigma.reshape((sigma.shape[0],) + (1,) * (x.ndim - 1))


class EPS:
    sigma_max = 14.6146

    @staticmethod
    def noise_scaling(sigma, eps, x0):
        return x0 + _s(sigma, x0) * eps

    @staticmethod
    def scale_in(x, sigma):
        return x / (_s(sigma, x) ** 2 + 1).sqrt()

    @staticmethod
    def denoise(x, sigma, out):
        return x - out * _s(sigma, x)

    @staticmethod
    def true_output(x0, eps, sigma):
        return eps


class V(EPS):
    sigma_max = 4096.0  # zero terminal SNR pushes sigma_max very high

    @staticmethod
    def denoise(x, sigma, out):
        s = _s(sigma, x)
        return x / (s ** 2 + 1) - out * s / (s ** 2 + 1).sqrt()

    @staticmethod
    def true_output(x0, eps, sigma):
        s = _s(sigma, x0)
        x = x0 + s * eps
        return (x / (s ** 2 + 1) - x0) * (s ** 2 + 1).sqrt() / s


class FLOW:
    sigma_max = 1.0

    @staticmethod
    def noise_scaling(sigma, eps, x0):
        s = _s(sigma, x0)
        return s * eps + (1 - s) * x0

    @staticmethod
    def scale_in(x, sigma):
        return x

    @staticmethod
    def denoise(x, sigma, out):
        return x - out * _s(sigma, x)

    @staticmethod
    def true_output(x0, eps, sigma):
        return eps - x0


PARAMS = {"eps": EPS, "v": V, "flow": FLOW}


class LoRAConv(nn.Module):
    """A 3x3 conv with a LoRA delta that the switch turns off; base weights are frozen."""

    def __init__(self, cin, cout, switch: AdapterSwitch, rank=2):
        super().__init__()
        self.base = nn.Conv2d(cin, cout, 3, padding=1)
        self.base.requires_grad_(False)
        self.down = nn.Parameter(torch.randn(rank, cin * 9) * 0.1)
        self.up = nn.Parameter(torch.zeros(cout, rank))
        self.switch = switch

    def forward(self, x):
        w = self.base.weight
        if self.switch.enabled:
            w = w + (self.up @ self.down).reshape(w.shape)
        return nn.functional.conv2d(x, w, self.base.bias, padding=1)


class ToyUNet(nn.Module):
    """in -> down -> mid (2 blocks; the last is the tap) -> up (with skip) -> out, sigma-conditioned."""

    def __init__(self, switch: AdapterSwitch, ch=8):
        super().__init__()
        self.emb = nn.Linear(1, ch)
        self.emb.requires_grad_(False)
        self.inp = LoRAConv(4, ch, switch)
        self.down = LoRAConv(ch, ch, switch)
        self.mid = nn.ModuleList([LoRAConv(ch, ch, switch), LoRAConv(ch, ch, switch)])
        self.up = LoRAConv(2 * ch, ch, switch)
        self.out = LoRAConv(ch, 4, switch)
        self.up_calls = 0

    def forward(self, x, sigma):
        e = self.emb(torch.log(sigma).reshape(-1, 1))[:, :, None, None]
        h0 = torch.nn.functional.silu(self.inp(x) + e)
        h = torch.nn.functional.avg_pool2d(torch.nn.functional.silu(self.down(h0)), 2)
        for blk in self.mid:
            h = h + torch.nn.functional.silu(blk(h))
        self.up_calls += 1
        h = torch.nn.functional.interpolate(h, scale_factor=2.0)
        h = torch.nn.functional.silu(self.up(torch.cat([h, h0], 1)))
        return self.out(h)


def host_callables(net: ToyUNet, switch: AdapterSwitch, param, early_exit=True):
    """What a host supplies to the objective: predict_x0 (adapter on) and frozen_features (adapter off)."""
    tap = FeatureTap(net.mid[-1], early_exit=early_exit)

    def predict_x0(x_t, sigma):
        return param.denoise(x_t, sigma, net(param.scale_in(x_t, sigma), sigma))

    def frozen_features(x, sigma):
        with switch.off():
            return tap(net, param.scale_in(x, sigma), sigma)

    return predict_x0, frozen_features, tap


def make_batch(B=3, seed=0, param=EPS):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 4, 8, 8, generator=g)
    eps = torch.randn(B, 4, 8, 8, generator=g)
    lo, hi = (0.03, min(param.sigma_max, 14.6)) if param is not FLOW else (0.01, 0.99)
    sigma = torch.exp(torch.empty(B).uniform_(math.log(lo), math.log(hi), generator=g))
    sigma_p = torch.exp(torch.empty(B).uniform_(math.log(lo), math.log(hi), generator=g))
    return x0, eps, sigma, sigma_p
