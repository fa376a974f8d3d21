"""Mirrors modules/devices.py on a CPU-only machine: device/dtype globals, autocast no-ops, NaN check."""
import contextlib

import torch

cpu = torch.device("cpu")
device = device_interrogate = device_gfpgan = device_esrgan = device_codeformer = cpu
dtype = dtype_vae = dtype_unet = dtype_inference = torch.float32
unet_needs_upcast = False
fp8 = False


def get_device_for(task):
    return cpu


def cond_cast_unet(input):
    return input


def cond_cast_float(input):
    return input.float() if unet_needs_upcast else input


def torch_gc():
    pass


def autocast(disable=False):
    return contextlib.nullcontext()


def without_autocast(disable=False):
    return contextlib.nullcontext()


class NansException(Exception):
    pass


def test_for_nans(x, where):
    if not torch.isnan(x[(0, ) * len(x.shape)]):
        return
    raise NansException(f"A tensor with NaNs was produced in {where}.")
