"""One user session in the real WebUI's UI, driven in headless Chromium (run by test_browser.py).

Runs in the browser venv (selenium; see build_host.browser_part), never in the WebUI's venv,
against a WebUI that is already serving its UI:

    .realhost/browser/bin/python tests/realhost/browser_session.py --url http://127.0.0.1:PORT \
        --reference ref.png --out SCREENSHOT_DIR

What a user does, step by step, each checked in the page and saved as a screenshot:
the txt2img tab with the SSR-Encoder accordion (the extension's tooltips in place), enabling
it, choosing the SSR and CLIP weights, uploading a reference image into Subject 1, a query,
"Preview selection" (a heatmap appears, no error note), a 64x64 3-step generation (an image
appears, the generation info names the SSR fields and the PNG carries them), then after a
page reload (every field back at its default) PNG Info with that PNG and "Send to txt2img",
which must restore enabled, scale, start/end, model, CLIP and the query in the accordion.

Exits 0 when every step passed; otherwise prints ``FAILED at step '<step>': <why>``, saves
a screenshot of the page as it was and exits 1. Uses Debian's ``chromium`` and
``chromedriver`` (found on PATH; paths passed explicitly).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

P = "script_txt2img_ssrencoder_"  # the WebUI's elem_id prefix of this script's txt2img controls
SSR_MODEL = "tiny_ssr.safetensors"
CLIP_MODEL = "clip_vision/tiny-clip-vit"
QUERY = "the red shape"
PROMPT = "a photo of a toy"
SCALE = "0.8"  # not the default (0.65), so that its restoration is seen
START, END = "0.1", "0.9"


class StepFailed(Exception):
    pass


class Session:
    chromium_args = ()  # added to the command line of headless Chromium

    def __init__(self, url: str, out: str, timeout: float):
        self.url = url.rstrip("/")
        self.out = out
        self.timeout = timeout
        self.step = "start the browser"
        self.shots = []
        self.console_errors = []
        self.stage = 0
        self.t0 = time.time()
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        driver = shutil.which("chromedriver")
        if not chromium or not driver:
            raise StepFailed("Debian's chromium and chromium-driver are not installed "
                             "(apt-get install chromium chromium-driver fonts-noto-color-emoji)")
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        self.profile = tempfile.mkdtemp(prefix="ssr-chromium-profile-")
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--window-size=1400,1800", "--hide-scrollbars",
                    f"--user-data-dir={self.profile}", *self.chromium_args):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.d = webdriver.Chrome(service=Service(driver), options=options)
        self.d.set_page_load_timeout(timeout)

    # ------------------------------------------------------------------ helpers

    def begin(self, step: str) -> None:
        self.drain_console()
        self.step = step
        print(f"[browser] {time.time() - self.t0:6.1f} s  {step}", flush=True)

    def wait(self, condition, what: str, timeout: float = None):
        """WebDriverWait with a bounded timeout; condition(driver) -> truthy value."""
        try:
            return WebDriverWait(self.d, timeout or self.timeout, poll_frequency=0.25).until(condition)
        except TimeoutException:
            raise StepFailed(f"timed out after {timeout or self.timeout:.0f} s waiting for {what}") from None

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def el(self, css: str):
        return self.wait(lambda d: (d.find_elements(By.CSS_SELECTOR, css) or [None])[0], f"an element '{css}'")

    def shot(self, name: str, element_css: str = None) -> str:
        """Saves the window (and, with element_css, that element alone as ``<name>-detail.png``)."""
        self.stage += 1
        path = os.path.join(self.out, f"{self.stage:02d}-{name}.png")
        self.d.save_screenshot(path)
        self.shots.append(path)
        if element_css:
            found = self.d.find_elements(By.CSS_SELECTOR, element_css)
            if found:
                detail = path[:-4] + "-detail.png"
                found[0].screenshot(detail)
                self.shots.append(detail)
        return path

    def scroll_to(self, css: str):
        element = self.el(css)
        self.js("arguments[0].scrollIntoView({block: 'start'}); window.scrollBy(0, -10);", element)
        return element

    def text_input(self, css: str):
        return self.el(f"{css} textarea, {css} input[type=text], {css} input:not([type])")

    def type_text(self, css: str, text: str) -> None:
        box = self.text_input(css)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text)
        self.wait(lambda d: box.get_attribute("value") == text, f"'{text}' in {css}")

    def set_number(self, css: str, value: str) -> None:
        """A gradio slider's number box: typed, then left (gradio reads it on change/blur)."""
        box = self.el(f"{css} input[type=number]")
        self.js("arguments[0].scrollIntoView({block: 'center'});", box)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(value)
        box.send_keys(Keys.TAB)
        self.wait(lambda d: float(self.el(f"{css} input[type=range]").get_attribute("value")) == float(value),
                  f"{css}'s slider to follow the typed value {value}")

    def number(self, css: str) -> float:
        return float(self.el(f"{css} input[type=number]").get_attribute("value"))

    def choose(self, css: str, label: str) -> None:
        """A gradio dropdown: click its input, pick the option from the listbox (gradio 3.41 names
        an option in ``data-value``, gradio 4 in ``aria-label``)."""
        box = self.el(f"{css} input")
        self.js("arguments[0].scrollIntoView({block: 'center'});", box)
        box.click()

        def option(d):
            for li in d.find_elements(By.CSS_SELECTOR, f"{css} ul.options li"):
                if label in (li.get_attribute("data-value"), li.get_attribute("aria-label"), li.text.strip()):
                    return li
            return None

        li = self.wait(option, f"the option '{label}' in the list of {css}")
        names = [x.text.strip() for x in self.d.find_elements(By.CSS_SELECTOR, f"{css} ul.options li")]
        li.click()
        self.wait(lambda d: box.get_attribute("value") == label,
                  f"{css} to show '{label}' (options listed: {names})")

    def checkbox_states(self) -> tuple:
        """(WebUI's visible checkbox in the accordion label, the hidden gradio checkbox, accordion open)."""
        return tuple(self.js(
            "const a = document.getElementById(arguments[0] + 'enabled');"
            "const v = document.getElementById(arguments[0] + 'enabled-visible-checkbox');"
            "const g = document.querySelector('#' + arguments[0] + 'enabled-checkbox input');"
            "return [v ? v.checked : null, g ? g.checked : null,"
            " a.querySelector('.label-wrap').classList.contains('open')];", P))

    def open_page(self) -> None:
        self.d.get(self.url + "/")
        try:  # onUiLoaded has run once the WebUI's inputAccordion.js put its checkbox into the label
            self.wait(lambda d: d.find_elements(By.ID, P + "enabled-visible-checkbox"),
                      "the WebUI to finish loading its UI (the accordion's label checkbox)", timeout=max(self.timeout, 120))
        except StepFailed as e:
            if self.js("return typeof onUiLoaded") == "undefined":
                raise StepFailed(f"{e}: the WebUI's own script.js did not load (gradio 3.41 refuses to serve files "
                                 "below a folder whose name starts with a dot; is the WebUI folder below one?)") from None
            raise

    def click_tab(self, label: str) -> None:
        def button(d):
            for b in d.find_elements(By.CSS_SELECTOR, "#tabs > .tab-nav > button"):
                if b.text.strip() == label:
                    return b
            return None

        self.wait(button, f"the top tab '{label}'").click()

    def drain_console(self) -> None:
        """The page's console errors since the last call, printed with the step they came in.
        Only the extension's own fail the session: the WebUI v1.10.1 page logs others by itself
        (its CDN iframe-resizer offline; gradio's "reading 'props'" twice per Width or Height
        slider change: the WebUI's JS-only onCalcResolutionHires handler has no outputs but
        returns six values; the same with no extension installed)."""
        try:
            entries = self.d.get_log("browser")
        except Exception:  # noqa: BLE001 - log not offered by this driver, or no session yet
            return
        for e in entries:
            if e.get("level") == "SEVERE":
                message = e.get("message", "")
                self.console_errors.append((self.step, message))
                print(f"[browser] console error during '{self.step}': {message[:300]}", flush=True)

    def fail_on_console_errors(self) -> None:
        self.drain_console()
        ours = [f"{step}: {m}" for step, m in self.console_errors if "ssr_encoder" in m or "ssrencoder" in m]
        if ours:
            raise StepFailed("the extension's javascript logged errors: " + " | ".join(ours))

    # ------------------------------------------------------------------ the session

    def run(self, reference: str) -> None:
        self.open_accordion_closed()
        self.enable_accordion()

        self.begin("choose the SSR and CLIP weights")
        self.choose("#" + P + "model", SSR_MODEL)
        self.choose("#" + P + "clip_model", CLIP_MODEL)
        self.set_number("#" + P + "scale", SCALE)
        self.set_number("#" + P + "start", START)
        self.set_number("#" + P + "end", END)

        self.begin("upload a reference image into Subject 1, type a query")
        self.upload_reference(reference)
        # the sketch tool draws the image into canvases once they have a size
        self.wait(lambda d: self.js(
            "const c = document.querySelectorAll('#' + arguments[0] + 'image_1 canvas');"
            "return c.length > 0 && Array.from(c).every(x => x.width > 0 && x.height > 0);", P),
            "Subject 1's sketch canvases to get a size")
        self.type_text("#" + P + "query_1", QUERY)
        self.scroll_to("#" + P + "enabled")
        self.shot("accordion-filled", "#" + P + "enabled")

        self.preview(f"'{QUERY}'")
        png = self.generate(PROMPT, "3", ["SSR-Encoder: True", f"SSR scale: {SCALE}", f"SSR start: {START}",
                                          f"SSR end: {END}", f"SSR model: {SSR_MODEL}", f"SSR CLIP: {CLIP_MODEL}",
                                          f"SSR 1 query: {QUERY}", "SSR 1 mode: text"])
        self.restore_from_png(png)
        self.fail_on_console_errors()

    def open_accordion_closed(self) -> None:
        """The txt2img tab with the accordion closed, disabled, titled, with the extension's tooltips."""
        self.begin("open the WebUI, txt2img tab")
        self.open_page()
        acc = self.scroll_to("#" + P + "enabled")
        title = self.js("return arguments[0].querySelector('.label-wrap span').textContent.trim()", acc)
        if title != "SSR-Encoder":
            raise StepFailed(f"the accordion's label is '{title}', not 'SSR-Encoder'")
        if self.checkbox_states() != (False, False, False):
            raise StepFailed(f"the accordion should start closed and disabled; (label checkbox, gradio checkbox, open) = {self.checkbox_states()}")
        tip = self.js("return document.getElementById(arguments[0]).title", P + "model")
        if not tip:
            raise StepFailed("javascript/ssr_encoder.js set no tooltip on the model dropdown (did its onUiLoaded run?)")
        self.shot("txt2img-accordion-closed", "#" + P + "enabled")

    def enable_accordion(self) -> None:
        self.begin("enable the accordion (open it)")
        self.el("#" + P + "enabled .label-wrap").click()
        self.wait(lambda d: self.checkbox_states() == (True, True, True),
                  "the accordion to open and its checkboxes to be checked")
        if not self.el("#" + P + "model").is_displayed():
            raise StepFailed("the model dropdown is not shown in the opened accordion")

    def upload_reference(self, reference: str) -> None:
        upload = self.wait(lambda d: (d.find_elements(By.CSS_SELECTOR, f"#{P}image_1 input[type=file]") or [None])[0],
                           "Subject 1's file input")
        upload.send_keys(os.path.abspath(reference))
        self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{P}image_1 canvas, #{P}image_1 img"),
                  "the uploaded image to show in Subject 1")

    def preview(self, caption_part: str) -> None:
        """"Preview selection": a heatmap, no note in the status, a caption holding ``caption_part``."""
        self.begin("Preview selection")
        self.scroll_to("#" + P + "preview_button").click()
        thumbs = self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{P}preview img"),
                           "the selection preview's heatmap image")
        status = self.el("#" + P + "status").text.strip()
        if status:
            raise StepFailed(f"the preview wrote a note: {status}")
        caption = self.js("return document.getElementById(arguments[0]).innerText", P + "preview")
        if caption_part not in caption:
            raise StepFailed(f"the preview's caption does not say {caption_part!r}: {caption!r}")
        self.wait(lambda d: self.js("return arguments[0].complete && arguments[0].naturalWidth > 0", thumbs[0]),
                  "the heatmap image to load")
        self.scroll_to("#" + P + "enabled")
        self.shot("preview-heatmap", "#" + P + "enabled")

    def generate(self, prompt: str, steps: str, expected: list) -> str:
        """A 64x64 txt2img generation; the info under the image must hold every ``expected``
        text. -> the downloaded PNG's path (its text chunk holds the SSR fields)."""
        self.begin(f"prompt, 64x64, {steps} steps, Generate")
        self.js("window.scrollTo(0, 0)")
        self.type_text("#txt2img_prompt", prompt)
        self.set_number("#txt2img_width", "64")
        self.set_number("#txt2img_height", "64")
        self.set_number("#txt2img_steps", steps)
        self.el("#txt2img_generate").click()
        image = self.wait(lambda d: (d.find_elements(By.CSS_SELECTOR, "#txt2img_gallery img") or [None])[0],
                          "the generated image in txt2img's gallery")
        info = self.wait(lambda d: (lambda t: t if "Steps:" in t else None)(self.el("#html_info_txt2img").text),
                         "the generation info under the image")
        missing = [e for e in expected if e not in info]
        if missing:
            raise StepFailed(f"the generation info lacks {missing}: {info!r}")
        for bad in ("SSR error", "not applied"):
            if bad in info:
                raise StepFailed(f"the generation info says '{bad}': {info!r}")
        self.wait(lambda d: d.find_element(By.ID, "txt2img_generate").is_displayed()
                  and not d.find_elements(By.CSS_SELECTOR, "#txt2img_results .progressDiv"),
                  "the generation to finish (Generate shown again, no progress bar)")
        self.js("window.scrollTo(0, 0)")
        self.shot("generated", "#txt2img_results")

        self.begin("download the generated PNG")
        src = image.get_attribute("src")
        if urllib.parse.urlsplit(src).hostname not in ("127.0.0.1", "localhost"):
            raise StepFailed(f"the image is not served by the WebUI: {src}")
        png = os.path.join(self.out, "generated.png")
        with urllib.request.urlopen(src, timeout=self.timeout) as r, open(png, "wb") as f:
            f.write(r.read())
        with open(png, "rb") as f:
            head = f.read()
        if not head.startswith(b"\x89PNG") or b"SSR-Encoder" not in head:
            raise StepFailed(f"the downloaded image ({src}) is not a PNG with the SSR fields in its text chunk")
        return png

    def restore_from_png(self, png: str) -> None:
        """After a reload (defaults back), PNG Info with ``png`` and "Send to txt2img" restore the fields."""
        self.begin("reload the page: every field back at its default")
        self.open_page()
        if self.checkbox_states()[:2] != (False, False):
            raise StepFailed("after a reload the accordion should be disabled again")
        defaults = self.field_values()
        print(f"[browser] defaults after reload: {json.dumps(defaults)}", flush=True)

        self.begin("PNG Info: upload the generated PNG")
        self.click_tab("PNG Info")
        upload = self.wait(lambda d: (d.find_elements(By.CSS_SELECTOR, "#pnginfo_image input[type=file]") or [None])[0],
                           "PNG Info's file input")
        upload.send_keys(png)
        self.wait(lambda d: "SSR-Encoder" in self.js("return document.getElementById('tab_pnginfo').innerText"),
                  "PNG Info to show the SSR fields")
        self.shot("pnginfo", "#tab_pnginfo")

        self.begin("Send to txt2img: the SSR fields are restored")
        send = self.wait(lambda d: (lambda b: b[0] if b and b[0].is_displayed() else None)(
            d.find_elements(By.CSS_SELECTOR, "#tab_pnginfo #txt2img_tab")), "PNG Info's 'Send to txt2img' button")
        send.click()
        want = {"enabled": [True, True], "scale": float(SCALE), "start": float(START), "end": float(END),
                "model": SSR_MODEL, "clip_model": CLIP_MODEL, "query_1": QUERY, "prompt": PROMPT}
        try:
            self.wait(lambda d: self.field_values() == want, "the SSR fields to be restored", timeout=30)
        except StepFailed:
            raise StepFailed(f"after Send to txt2img the fields are {self.field_values()}, expected {want}") from None
        if not self.checkbox_states()[2]:
            raise StepFailed("the SSR-Encoder accordion was enabled but not opened by Send to txt2img")
        self.scroll_to("#" + P + "enabled")
        self.shot("restored", "#" + P + "enabled")

    def field_values(self) -> dict:
        v = self.checkbox_states()
        return {"enabled": list(v[:2]), "scale": self.number("#" + P + "scale"), "start": self.number("#" + P + "start"),
                "end": self.number("#" + P + "end"),
                "model": self.el(f"#{P}model input").get_attribute("value"),
                "clip_model": self.el(f"#{P}clip_model input").get_attribute("value"),
                "query_1": self.text_input("#" + P + "query_1").get_attribute("value"),
                "prompt": self.text_input("#txt2img_prompt").get_attribute("value")}

    def close(self) -> None:
        try:
            self.d.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


def main(session_class=Session, description: str = __doc__) -> int:
    """The command line of a session script; ``session_class(url, out, timeout).run(reference)``
    is the session (browser_session_gradio4.py runs its own through here)."""
    ap = argparse.ArgumentParser(description=description.split("\n")[0])
    ap.add_argument("--url", required=True, help="the WebUI, e.g. http://127.0.0.1:7860")
    ap.add_argument("--reference", required=True, help="reference image (PNG) to upload")
    ap.add_argument("--out", required=True, help="folder for the screenshots")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds each wait may take")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    session = None
    try:
        session = session_class(args.url, args.out, args.timeout)
        session.run(args.reference)
    except Exception as e:  # noqa: BLE001 - reported with the step it happened in
        step = session.step if session else "start the browser"
        why = str(e) if isinstance(e, StepFailed) else "".join(traceback.format_exception_only(type(e), e)).strip()
        print(f"FAILED at step '{step}': {why}", flush=True)
        if session:
            try:
                print(f"[browser] page at failure: {session.shot('FAILED')}", flush=True)
            except Exception:  # noqa: BLE001
                pass
        return 1
    finally:
        if session:
            print("[browser] screenshots: " + ", ".join(os.path.basename(s) for s in session.shots), flush=True)
            session.close()
    print(f"[browser] all steps passed in {time.time() - session.t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
