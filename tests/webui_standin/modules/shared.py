"""Mirrors modules/shared.py: the process-wide singletons an extension reads.

`opts`, `cmd_opts` and `state` are created once and only ever mutated in place (extensions keep references to them);
`sd_model` is set by harness.load_model(). `reset_opts()` is a stand-in addition for test isolation.
"""
from modules import devices, options, paths, shared_cmd_options, shared_options, shared_state

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser

OptionInfo = options.OptionInfo
OptionHTML = options.OptionHTML
options_section = options.options_section

opts = options.Options(shared_options.options_templates(), restricted_opts=set())
state = shared_state.State()

sd_model = None
device = devices.device
models_path = paths.models_path  # copied at startup, as in the WebUI; read modules.paths.models_path instead
script_path = paths.script_path
data_path = paths.data_path

xformers_available = False
loaded_hypernetworks = []
sd_upscalers = []
latent_upscale_default_mode = "Latent"
latent_upscale_modes = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}


class TotalTQDM:
    def reset(self):
        pass

    def update(self):
        pass

    def updateTotal(self, new_total):
        pass

    def clear(self):
        pass


total_tqdm = TotalTQDM()


def reset_opts():
    """Stand-in helper: built-in options back to their defaults, options added by extensions removed (same object)."""
    opts.data_labels.clear()
    opts.data_labels.update(shared_options.options_templates())
    opts.data.clear()
    opts.data.update({k: v.default for k, v in opts.data_labels.items() if not v.do_not_save})
