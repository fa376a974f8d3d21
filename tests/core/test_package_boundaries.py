"""ssr/ stays a plain-PyTorch library: the WebUI glue and the trainer build on it, never the
other way round (the design card). Checked on the import statements of every module."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FORBIDDEN = ("modules", "launch", "ssr_webui", "scripts", "trainer", "gradio", "lightning", "pytorch_lightning", "diffusers", "transformers")


def imported_roots(path: pathlib.Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("path", sorted((ROOT / "ssr").glob("*.py")), ids=lambda p: p.name)
def test_ssr_imports_no_host_or_trainer_code(path):
    bad = sorted(set(imported_roots(path)) & set(FORBIDDEN))
    assert not bad, f"{path.name} imports {bad}"


def test_only_ssr_webui_and_scripts_know_the_webui():
    offenders = [p.relative_to(ROOT).as_posix() for folder in ("ssr", "trainer") for p in (ROOT / folder).rglob("*.py")
                 if {"modules", "launch"} & set(imported_roots(p))]
    assert not offenders
