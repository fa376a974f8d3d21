"""Mirrors modules/shared_cmd_options.py + modules/cmd_args.py: the argparse parser and the parsed `cmd_opts`.

Only the flags an extension (or this stand-in) reads are defined. Extensions add their own in preload.py
(`preload(parser)`); see script_loading.preload_extensions. `cmd_opts` is parsed from an empty argv.
"""
import argparse

from modules import paths

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", type=str, default=paths.data_path)
parser.add_argument("--models-dir", type=str, default=None)
parser.add_argument("--ckpt-dir", type=str, default=None)
parser.add_argument("--embeddings-dir", type=str, default=None)
parser.add_argument("--api", action="store_true")
parser.add_argument("--api-auth", type=str, default=None)
parser.add_argument("--api-log", action="store_true")
parser.add_argument("--nowebui", action="store_true")
parser.add_argument("--skip-install", action="store_true")
parser.add_argument("--xformers", action="store_true")
parser.add_argument("--force-enable-xformers", action="store_true")
parser.add_argument("--opt-sdp-attention", action="store_true")
parser.add_argument("--opt-sdp-no-mem-attention", action="store_true")
parser.add_argument("--opt-split-attention", action="store_true")
parser.add_argument("--disable-opt-split-attention", action="store_true")
parser.add_argument("--medvram", action="store_true")
parser.add_argument("--medvram-sdxl", action="store_true")
parser.add_argument("--lowvram", action="store_true")
parser.add_argument("--no-half", action="store_true")
parser.add_argument("--no-half-vae", action="store_true")
parser.add_argument("--precision", type=str, default="autocast")
parser.add_argument("--freeze-settings", action="store_true")
parser.add_argument("--freeze-settings-in-sections", type=str, default=None)
parser.add_argument("--freeze-specific-settings", type=str, default=None)
parser.add_argument("--hide-ui-dir-config", action="store_true")
parser.add_argument("--listen", action="store_true")
parser.add_argument("--port", type=int, default=None)

cmd_opts = parser.parse_args([])
