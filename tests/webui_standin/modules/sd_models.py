"""Mirrors the parts of modules/sd_models.py an extension reads: CheckpointInfo (name_for_extra, shorthash, title),
reload_model_weights() (a no-op: the stand-in never swaps models mid-generation)."""
import hashlib
import os

from modules import paths

checkpoints_list = {}
checkpoint_aliases = {}


class CheckpointInfo:
    def __init__(self, filename, sha256=None):
        self.filename = filename
        abspath = os.path.abspath(filename)
        models_dir = os.path.join(paths.models_path, "Stable-diffusion")
        name = os.path.relpath(abspath, models_dir) if abspath.startswith(models_dir) else os.path.basename(filename)
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.sha256 = sha256 or hashlib.sha256(os.path.basename(filename).encode()).hexdigest()
        self.hash = self.sha256[0:8]  # the WebUI's old-style model_hash reads a slice of the file instead
        self.shorthash = self.sha256[0:10]
        self.title = f'{self.name} [{self.shorthash}]'
        self.short_title = f'{self.name_for_extra} [{self.shorthash}]'
        self.ids = [self.hash, self.model_name, self.title, self.name, self.name_for_extra, f'{name} [{self.hash}]', self.shorthash, self.sha256, f'{self.name} [{self.sha256}]']
        self.metadata = {}

    def calculate_shorthash(self):
        return self.shorthash

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    from modules import shared
    return shared.sd_model


def apply_token_merging(sd_model, token_merging_ratio):
    pass


def get_closet_checkpoint_match(search_string):
    return checkpoint_aliases.get(search_string)
