"""Housekeeping the repository promises: an Apache-2.0 LICENSE, and code that cites only the
project's own notes (docs/method.md, docs/webui-host-notes.md), by sections that exist."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = ("ssr", "ssr_webui", "scripts", "trainer", "bench", "tests", "docs")
TOP_LEVEL = ("README.md", "convert.py", "install.py")
# Documents outside the repository that older comments cited.
FOREIGN = re.compile(r"ssr-method\.md|webui-host\.md|method doc|§|\.\./shared/docs")
CITATION = re.compile(r"docs/(method|webui-host-notes)\.md,? \(?sections? (\d+)(?: and (\d+))?")


def _text_files():
    for top in SOURCES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            for name in files:
                if name.endswith((".py", ".md", ".yaml", ".sh")):
                    yield os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/")
    for name in TOP_LEVEL:
        if os.path.isfile(os.path.join(ROOT, name)):
            yield name


def test_license_is_apache_2():
    text = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "LICENSE" in open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_no_citations_of_documents_outside_the_repository():
    offenders = []
    for path in _text_files():
        if path == "tests/core/test_docs_and_license.py":
            continue
        for number, line in enumerate(open(os.path.join(ROOT, path), encoding="utf-8", errors="replace"), 1):
            if FOREIGN.search(line):
                offenders.append(f"{path}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_cited_sections_exist():
    headings = {}
    for doc in ("method", "webui-host-notes"):
        text = open(os.path.join(ROOT, "docs", f"{doc}.md"), encoding="utf-8").read()
        headings[doc] = {int(n) for n in re.findall(r"^## (\d+)\.", text, flags=re.M)}
    cited = 0
    for path in _text_files():
        for match in CITATION.finditer(open(os.path.join(ROOT, path), encoding="utf-8", errors="replace").read()):
            for section in filter(None, match.groups()[1:]):
                cited += 1
                assert int(section) in headings[match.group(1)], f"{path}: {match.group(0)}"
    assert cited >= 10
