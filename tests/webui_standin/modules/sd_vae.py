"""Mirrors modules/sd_vae.py's infotext helpers: no separate VAE is ever loaded."""


def get_loaded_vae_name():
    return None


def get_loaded_vae_hash():
    return None


def reload_vae_weights(sd_model=None, vae_file=None):
    pass
