"""Mirrors modules/rng.py (ImageRNG) on the CPU: one torch.Generator per seed, so an image's noise depends only on
its seed. Subseeds / variation strength are not reproduced."""
import torch


class ImageRNG:
    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        self.shape = tuple(map(int, shape))
        self.seeds = seeds
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self.generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in self.seeds]
        self.is_first = True

    def first(self):
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])

    def next(self):
        """(B, *shape) noise; the first call and later calls both draw from each seed's generator."""
        self.is_first = False
        return self.first()
