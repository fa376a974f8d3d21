"""Render the SSR-Encoder accordion for the README: a screenshot from the real WebUI v1.10.1 (its
own stylesheet, sd-webui-controlnet beside the extension) in headless Chromium.

    python3 docs/tools/render_webui_screenshot.py docs/images/webui_accordion.png

Runs the browser test (tests/realhost/test_browser.py, through tests/realhost/run.sh, which
builds or reuses the real host) with its screenshots in a temporary folder, and copies the
accordion as it is after "Preview selection": the test's tiny random models, a reference
image with a red disc, the query and the heatmap. Needs Debian's chromium + chromium-driver.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGE = "preview-heatmap-detail.png"  # the accordion element after the preview (browser_session.py)


def main(output: str) -> None:
    shots = tempfile.mkdtemp(prefix="ssr-docs-screenshots-")
    try:
        subprocess.run(["bash", os.path.join(ROOT, "tests", "realhost", "run.sh"), "-k", "test_browser_session"],
                       check=True, env=dict(os.environ, SSR_SCREENSHOT_DIR=shots))
        found = glob.glob(os.path.join(shots, "*-" + STAGE))
        if not found:
            raise SystemExit(f"the browser test saved no '*-{STAGE}' in {shots}")
        shutil.copyfile(found[0], output)
    finally:
        shutil.rmtree(shots, ignore_errors=True)
    print(f"wrote {output}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "images", "webui_accordion.png"))
