"""Mirrors modules/sd_samplers.py: create_sampler(); only "Euler" (Automatic schedule) is available."""
from collections import namedtuple

from modules import sd_samplers_kdiffusion

SamplerData = namedtuple('SamplerData', ['name', 'constructor', 'aliases', 'options'])

all_samplers = [SamplerData('Euler', lambda model: sd_samplers_kdiffusion.KDiffusionSampler('sample_euler', model), ['k_euler'], {})]
all_samplers_map = {x.name: x for x in all_samplers}
samplers = all_samplers
samplers_for_img2img = all_samplers


def find_sampler_config(name):
    if name is not None:
        return all_samplers_map.get(name, None)
    return all_samplers[0]


def create_sampler(name, model):
    config = find_sampler_config(name)
    assert config is not None, f'bad sampler name: {name}'
    sampler = config.constructor(model)
    sampler.config = config
    return sampler


def get_sampler_and_scheduler(sampler_name, scheduler_name, *, convert_automatic=True):
    return (sampler_name if sampler_name in all_samplers_map else 'Euler'), 'Automatic'
