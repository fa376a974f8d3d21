"""The converter commands the README and docs/webui.md give work as written, from where users
stand: the WebUI folder, with the extension installed under ``extensions/``.

A temporary "WebUI folder" holds this repository as ``extensions/sd-webui-ssr-encoder`` (a
symlink, as a clone would be) and tiny weight files under ``models/``; each documented
command runs there in a fresh interpreter with no PYTHONPATH, must succeed, must print no
warning, and must write a file the loaders read.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from torch import nn

from ssr.clip_checkpoints import load_clip_image_encoder
from ssr.weights import load_ssr_weights, official_state_dicts
from tests.tiny_models import tiny_clip_image_encoder, tiny_ssr_weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTENSION = "extensions/sd-webui-ssr-encoder"
DOCS = ("README.md", os.path.join("docs", "webui.md"))


def documented_commands(marker: str):
    """{doc: [command lines]} of the converter commands in each doc's code that contain marker."""
    found = {}
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        lines = re.findall(r"^\s*(python [^\n`]*)", text, flags=re.M) + re.findall(r"`(python [^`]+)`", text)
        found[doc] = sorted({line.strip() for line in lines if marker in line})
    return found


@pytest.fixture
def webui_root(tmp_path):
    root = tmp_path / "stable-diffusion-webui"
    (root / "extensions").mkdir(parents=True)
    os.symlink(ROOT, str(root / EXTENSION), target_is_directory=True)
    return root


def run_documented(command: str, cwd) -> subprocess.CompletedProcess:
    args = shlex.split(command)
    assert args[0] == "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS", "PYTHONSTARTUP")}
    return subprocess.run([sys.executable] + args[1:], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=300)


def test_docs_give_the_same_ssr_command():
    commands = documented_commands("models/ssr_encoder/ssr_release")
    assert all(commands.values()), commands
    assert commands["README.md"] == commands[os.path.join("docs", "webui.md")], commands
    for line in commands["README.md"]:
        assert line.startswith(f"python {EXTENSION}/convert.py "), line


def test_documented_ssr_command_works_from_the_webui_folder(webui_root):
    release = webui_root / "models" / "ssr_encoder" / "ssr_release"
    release.mkdir(parents=True)
    aligner, layers = official_state_dicts(tiny_ssr_weights(seed=5, context_dim=768))
    torch.save(aligner, str(release / "pytorch_model.bin"))
    torch.save(layers, str(release / "pytorch_model_1.bin"))
    (command,) = documented_commands("models/ssr_encoder/ssr_release")["README.md"]
    result = run_documented(command, webui_root)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    output = shlex.split(command)[shlex.split(command).index("-o") + 1]
    model = load_ssr_weights(str(webui_root / output))
    assert model.family == "sd1" and len(model.attention) == 16


class _OpenAILayout(nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def forward(self, image):
        return self.visual(image) * self.logit_scale.exp()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # building the archive here
def test_documented_torchscript_command_works_from_the_webui_folder(webui_root):
    commands = documented_commands("--trust-torchscript")
    assert commands["README.md"] and commands["README.md"] == commands[os.path.join("docs", "webui.md")], commands
    (command,) = commands["README.md"]
    args = shlex.split(command)
    source = args[args.index("--trust-torchscript") + 1]
    encoder = tiny_clip_image_encoder(seed=2)
    (webui_root / os.path.dirname(source)).mkdir(parents=True, exist_ok=True)
    traced = torch.jit.trace(_OpenAILayout(encoder.visual).eval(), torch.zeros(1, 3, 224, 224), check_trace=False)
    torch.jit.save(traced, str(webui_root / source))
    result = run_documented(command, webui_root)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    loaded = load_clip_image_encoder(str(webui_root / args[args.index("-o") + 1]), expect_width=None)
    assert loaded.config == encoder.config
