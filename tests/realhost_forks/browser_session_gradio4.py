"""One user session in Forge's UI (gradio 4.40), driven in headless Chromium (run by
test_fork_browser.py in the browser venv, like tests/realhost/browser_session.py, whose
Session, helpers and command line it reuses):

    <cache>/browser/bin/python tests/realhost_forks/browser_session_gradio4.py --url http://127.0.0.1:PORT \
        --reference ref.png --out SCREENSHOT_DIR

The steps, each checked in the page and saved as a screenshot: the txt2img tab with the
SSR-Encoder accordion closed (the extension's tooltips in place), enabling it, choosing the
SSR and CLIP weights, uploading a reference image into Subject 1's gradio 4 ``ImageEditor``,
choosing its brush and painting a stroke over the subject with the mouse, the query left
empty (mask mode), "Preview selection" (a heatmap captioned as a mask selection, no note),
a 64x64 2-step generation whose info and PNG say ``SSR-Encoder: True`` and
``SSR 1 mode: mask``. Exits 0 when every step passed, else prints ``FAILED at step ...``.
"""
from __future__ import annotations

import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "realhost"))
from browser_session import P, PROMPT, Session, StepFailed, main  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

SSR_MODEL = "full_ssr.safetensors"  # what the fork models folder holds (make_fork_models.py)
CLIP_MODEL = "clip_vision/tiny-clip-vit"
SCALE = "0.5"  # the mask default of the README; not the UI default 0.65
EDITOR = f"#{P}image_1"


# gradio 4's ImageEditor draws with pixi.js (WebGL), which headless Chromium renders in software:
# every editor on the page redraws at the display's frame rate, the GPU process takes a whole
# core and each browser command then takes seconds. Animation frames are capped at 5 a second
# for this session; the editors still draw every change, a little later.
FRAME_CAP = """(() => {
  const frame = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = (callback) => setTimeout(() => frame(callback), 200);
})();"""


class Gradio4Session(Session):
    def __init__(self, url: str, out: str, timeout: float):
        super().__init__(url, out, timeout)
        self.d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FRAME_CAP})

    def run(self, reference: str) -> None:
        self.open_accordion_closed()
        self.enable_accordion()

        self.begin("choose the SSR and CLIP weights")
        for css, label in (("#" + P + "model", SSR_MODEL), ("#" + P + "clip_model", CLIP_MODEL)):
            if self.el(f"{css} input").get_attribute("value") != label:  # the first choice is preselected
                self.choose(css, label)
        self.set_number("#" + P + "scale", SCALE)

        self.begin("upload a reference image into Subject 1's ImageEditor")
        self.upload_reference(reference)
        with open(reference, "rb") as f:  # a PNG's IHDR: width and height, big-endian, at bytes 16-24
            size = list(struct.unpack(">II", f.read(24)[16:24]))
        self.wait(lambda d: self.js(
            "const c = document.querySelector(arguments[0] + ' canvas');"
            "return c && c.width === arguments[1] && c.height === arguments[2];", EDITOR, *size),
            f"the editor's canvas to take the reference image's size {size}")
        self.scroll_to(EDITOR)
        self.shot("reference-uploaded", EDITOR)

        self.begin("choose the brush and paint over the subject")
        self.paint_stroke()
        self.scroll_to(EDITOR)
        self.shot("mask-painted", EDITOR)
        if self.text_input("#" + P + "query_1").get_attribute("value"):
            raise StepFailed("Subject 1's query should be empty (mask mode)")

        self.preview("mask query")
        png = self.generate(PROMPT, "2", ["SSR-Encoder: True", f"SSR scale: {SCALE}", f"SSR model: {SSR_MODEL}",
                                          f"SSR CLIP: {CLIP_MODEL}", "SSR 1 mode: mask", "SSR 1 mask weight: 5"])
        print(f"[browser] generated {png}", flush=True)
        self.fail_on_console_errors()

    def paint_stroke(self) -> None:
        """Clicks the editor's "Draw button" (its fixed white brush) and drags the mouse in three
        horizontal strokes across the middle of the canvas, where the reference's disc is; the
        editor must then offer Undo (it recorded the strokes)."""
        draw = self.el(f"{EDITOR} button[aria-label='Draw button']")
        draw.click()
        canvas = self.el(f"{EDITOR} canvas")
        self.js("arguments[0].scrollIntoView({block: 'center'});", canvas)
        w, h = canvas.size["width"], canvas.size["height"]
        for dy in (-0.12, 0.0, 0.12):  # offsets from the canvas centre, a third of its width long
            chain = ActionChains(self.d, duration=50)
            chain.move_to_element_with_offset(canvas, int(-w / 6), int(dy * h)).click_and_hold()
            for step in range(1, 9):
                chain.move_by_offset(int(w / 3 / 8), 0)
            chain.release().perform()
        self.wait(lambda d: d.find_element(By.CSS_SELECTOR, f"{EDITOR} button[aria-label='Undo']").is_enabled(),
                  "the editor to record the painted strokes (Undo enabled)")


if __name__ == "__main__":
    sys.exit(main(Gradio4Session, __doc__))
