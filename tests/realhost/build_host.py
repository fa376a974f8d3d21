#!/usr/bin/env python3
"""Build the real host the extension is tested in: WebUI v1.10.1 + sd-webui-controlnet v1.1.455.

Standard library only, so that it runs before any venv exists:

    python3 tests/realhost/build_host.py            # build what is missing or out of date, print the paths
    python3 tests/realhost/build_host.py --check    # exit 1 unless everything is built and current

Everything goes into one git-ignored cache folder (``$SSR_REALHOST_CACHE``, default
``<repo>/.realhost``), in three parts, each rebuilt only when its inputs change (a stamp file
holds the hash of the inputs):

    venv/     the WebUI's own Python 3.10 venv: torch 2.1.2 / torchvision 0.16.2, the WebUI's
              requirements_versions.txt, clip-anytorch, ControlNet's dependencies kept inside
              the WebUI's pins, and the test tools (pytest, webuiapi, httpx)
    webui/    the v1.10.1 source bundle with its five repositories/ (never written to by tests:
              each test session gets its own --data-dir, see ``make_data_dir``)
    models/   tiny random-initialised models of the real architectures and file formats
              (written by make_models.py inside the venv)
    browser/  a separate venv (this Python 3) with selenium, for the browser test: selenium
              in the WebUI's venv would upgrade h11 past its httpcore pin. The browser itself
              is Debian's ``chromium`` + ``chromium-driver`` (apt; .ci/run installs them).

With ``--forks`` (or ``build(forks=True)``) also the two forks, for tests/realhost_forks:

    reforge/, forge/            their source bundles, each with the five repositories/
    reforge-venv/, forge-venv/  a Python 3.10 venv per fork, layered on venv/: a .pth file adds
                                venv/'s site-packages *after* the fork venv's own, and the
                                fork's requirements_versions.txt (torch dropped: both run on
                                venv/'s torch 2.1.2) are installed into the fork venv, so its
                                pins shadow venv/'s and venv/ itself is never changed
    fork-models/                an SD1.5-sized random checkpoint (both forks find the
                                architecture from tensor shapes) and the models beside it
                                (make_fork_models.py)

The bundles come from ``../shared/hosts`` (``$SSR_HOSTS_DIR`` overrides).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
HOSTS = os.environ.get("SSR_HOSTS_DIR") or os.path.join(os.path.dirname(REPO), "shared", "hosts")
CACHE = os.path.abspath(os.environ.get("SSR_REALHOST_CACHE") or os.path.join(REPO, ".realhost"))
EXTENSION_NAME = "sd-webui-ssr-encoder"

WEBUI_BUNDLE = "stable-diffusion-webui.tar.gz"
REPOSITORY_BUNDLES = ("stable-diffusion-webui-assets", "stable-diffusion-stability-ai", "generative-models",
                      "k-diffusion", "BLIP")
CONTROLNET_BUNDLE = "sd-webui-controlnet.tar.gz"

TORCH = ["torch==2.1.2", "torchvision==0.16.2"]  # the WebUI v1.10.1 default
# ControlNet v1.1.455's requirements.txt, pinned inside the WebUI's pins (its installer would
# upgrade opencv to 4.10+ and pull numpy 2; mediapipe 1.x lacks mediapipe.solutions).
CONTROLNET_DEPS = ["opencv-python==4.9.0.80", "timm==0.9.5", "pydantic==1.10.17", "fvcore", "svglib", "addict",
                   "yapf", "albumentations==1.4.3", "matplotlib", "facexlib", "controlnet_aux==0.0.10",
                   "opencv-python-headless==4.9.0.80"]
CONTROLNET_NO_DEPS = ["mediapipe==0.10.14"]
TEST_TOOLS = ["pytest", "webuiapi==0.9.17"]
BROWSER_TOOLS = ["selenium==4.51.0"]  # own venv, see browser_part (4.52.0 needs a certifi newer than the registry has)


def log(msg: str) -> None:
    print(f"[realhost] {msg}", flush=True)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def bundle(name: str) -> str:
    path = os.path.join(HOSTS, name if name.endswith(".tar.gz") else name + ".tar.gz")
    if not os.path.exists(path):
        raise SystemExit(f"host bundle missing: {path} (set SSR_HOSTS_DIR to the folder with the host bundles)")
    return path


def python310() -> str:
    candidates = [shutil.which("python3.10") or ""] + sorted(glob.glob("/root/.pyenv/versions/3.10*/bin/python3.10"))
    try:
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(glob.glob(os.path.join(root, "versions", "3.10*", "bin", "python3.10")))
    except OSError:
        pass
    for c in candidates:  # pyenv's shim is on PATH but fails unless 3.10 is selected: try each
        if c and os.access(c, os.X_OK) and subprocess.run([c, "-c", "pass"], capture_output=True).returncode == 0:
            return c
    raise SystemExit("Python 3.10 (the WebUI's Python) was not found: install it (pyenv install 3.10) or put python3.10 on PATH")


class Part:
    """A cache folder with a stamp of its inputs' hash."""

    def __init__(self, name: str, key: str):
        self.path = os.path.join(CACHE, name)
        self.key = key
        self.stamp = self.path + ".stamp"

    def current(self) -> bool:
        try:
            with open(self.stamp) as f:
                return f.read().strip() == self.key and os.path.isdir(self.path)
        except OSError:
            return False

    def begin(self) -> None:
        if os.path.exists(self.stamp):
            os.remove(self.stamp)
        shutil.rmtree(self.path, ignore_errors=True)

    def done(self) -> None:
        with open(self.stamp, "w") as f:
            f.write(self.key + "\n")


def _untar(path: str, dest: str) -> None:
    """Unpack a ``git archive`` bundle whose single top folder is dropped."""
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(path) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 1)
            if len(parts) < 2 or not parts[1]:
                continue
            if m.issym() or m.islnk() or ".." in parts[1].split("/"):
                continue
            m.name = parts[1]
            members.append(m)
        tar.extractall(dest, members=members)


# ------------------------------------------------------------------------------------ parts

def webui_part() -> Part:
    names = [WEBUI_BUNDLE, CONTROLNET_BUNDLE] + [n + ".tar.gz" for n in REPOSITORY_BUNDLES]
    return Part("webui", digest("webui-v1", [(n, sha256_file(bundle(n))) for n in names]))


def build_webui(part: Part) -> None:
    part.begin()
    log(f"unpacking WebUI v1.10.1 into {part.path}")
    _untar(bundle(WEBUI_BUNDLE), part.path)
    for name in REPOSITORY_BUNDLES:
        _untar(bundle(name), os.path.join(part.path, "repositories", name))
    # ControlNet is kept here and copied into each test session's data dir.
    _untar(bundle(CONTROLNET_BUNDLE), os.path.join(part.path, "_bundled_extensions", "sd-webui-controlnet"))
    part.done()


def venv_part(webui: Part) -> Part:
    reqs = open(os.path.join(webui.path, "requirements_versions.txt")).read()
    return Part("venv", digest("venv-v1", python310(), TORCH, reqs, CONTROLNET_DEPS, CONTROLNET_NO_DEPS, TEST_TOOLS))


def constraints_file(webui: Part) -> str:
    """The WebUI's pins as pip constraints (the unpinned ``torch`` line dropped)."""
    lines = []
    for line in open(os.path.join(webui.path, "requirements_versions.txt")):
        line = line.split("#")[0].strip()
        if "==" in line:
            lines.append(line)
    lines += TORCH
    path = os.path.join(CACHE, "webui-constraints.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def pip(venv: str, *args: str) -> None:
    cmd = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--disable-pip-version-check",
           "--progress-bar", "off", "-q"] + list(args)
    log(" ".join(cmd[3:]))
    subprocess.run(cmd, check=True)


def build_venv(part: Part, webui: Part) -> None:
    part.begin()
    log(f"creating the WebUI's Python 3.10 venv in {part.path}")
    subprocess.run([python310(), "-m", "venv", part.path], check=True)
    cons = constraints_file(webui)
    pip(part.path, *TORCH)
    pip(part.path, "-c", cons, "-r", os.path.join(webui.path, "requirements_versions.txt"), "clip-anytorch")
    pip(part.path, "-c", cons, *CONTROLNET_DEPS)
    pip(part.path, "--no-deps", *CONTROLNET_NO_DEPS)
    pip(part.path, "-c", cons, *TEST_TOOLS)
    freeze = subprocess.run([os.path.join(part.path, "bin", "python"), "-m", "pip", "freeze"],
                            capture_output=True, text=True, check=True).stdout
    with open(os.path.join(part.path, "freeze.txt"), "w") as f:
        f.write(freeze)
    part.done()


MODEL_INPUTS = ("tests/realhost/make_models.py", "tests/tiny_models.py", "ssr/weights.py", "ssr/layers.py",
                "ssr/subject_encoder.py", "ssr/attention.py")


def models_part(venv: Part, webui: Part) -> Part:
    return Part("models", digest("models-v1", venv.key, webui.key,
                                 [sha256_file(os.path.join(REPO, p)) for p in MODEL_INPUTS]))


def build_models(part: Part, venv: Part, webui: Part) -> None:
    """Written into a new folder that then replaces the old one, so that a test session
    running meanwhile keeps complete files (the models are seeded: same inputs, same bytes)."""
    new, old = part.path + ".new", part.path + ".old"
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    log(f"writing tiny random models into {part.path}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(webui.path, "repositories", "stable-diffusion-stability-ai")]))
    subprocess.run([os.path.join(venv.path, "bin", "python"), os.path.join(HERE, "make_models.py"), new, part.path],
                   check=True, env=env, cwd=REPO)
    if os.path.exists(part.path):
        os.rename(part.path, old)
    os.rename(new, part.path)
    shutil.rmtree(old, ignore_errors=True)
    part.done()


def browser_part() -> Part:
    version = "%d.%d.%d" % sys.version_info[:3]
    return Part("browser", digest("browser-v1", os.path.realpath(sys.executable), version, BROWSER_TOOLS))


def build_browser(part: Part) -> None:
    part.begin()
    log(f"creating the browser driver's venv (selenium, Python {sys.version.split()[0]}) in {part.path}")
    subprocess.run([sys.executable, "-m", "venv", part.path], check=True)
    pip(part.path, *BROWSER_TOOLS)
    part.done()


# ------------------------------------------------------------------------------------ forks

FORKS = {
    "reforge": "stable-diffusion-webui-reForge.tar.gz",
    "forge": "stable-diffusion-webui-forge.tar.gz",
}
# What each fork's requirements_versions.txt cannot give offline or leaves out.
FORK_EXTRAS = {
    "reforge": [],
    "forge": ["huggingface-guess==0.1.0", "joblib"],
}


def fork_part(name: str) -> Part:
    names = [FORKS[name]] + [n + ".tar.gz" for n in REPOSITORY_BUNDLES]
    return Part(name, digest(name + "-v1", [(n, sha256_file(bundle(n))) for n in names]))


def build_fork(part: Part, name: str) -> None:
    part.begin()
    log(f"unpacking {name} into {part.path}")
    _untar(bundle(FORKS[name]), part.path)
    for repo in REPOSITORY_BUNDLES:
        _untar(bundle(repo), os.path.join(part.path, "repositories", repo))
    part.done()


def fork_requirements(fork: Part, name: str) -> list:
    """The fork's pinned requirements without torch (venv/'s torch 2.1.2 is used), a git
    URL replaced by the same version from the registry, plus FORK_EXTRAS."""
    reqs = []
    for line in open(os.path.join(fork.path, "requirements_versions.txt")):
        line = line.split("#")[0].strip()
        if not line or line.split("==")[0].strip().lower() in ("torch", "torchvision", "xformers"):
            continue
        if "://" in line:
            base = line.rsplit("/", 1)[-1]
            if base.startswith("pydantic-"):
                line = "pydantic==" + base.split("-")[1]
            else:
                continue
        reqs.append(line)
    return reqs + FORK_EXTRAS[name]


def site_packages(venv: str) -> str:
    return glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))[0]


def fork_venv_part(name: str, fork: Part, venv: Part) -> Part:
    return Part(name + "-venv", digest(name + "-venv-v1", venv.key, fork_requirements(fork, name)))


def build_fork_venv(part: Part, name: str, fork: Part, venv: Part) -> None:
    part.begin()
    log(f"creating {name}'s venv in {part.path}, layered on {venv.path}")
    subprocess.run([python310(), "-m", "venv", part.path], check=True)
    with open(os.path.join(site_packages(part.path), "zz_realhost_base.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({site_packages(venv.path)!r})\n")
    pip(part.path, *fork_requirements(fork, name))
    freeze = subprocess.run([os.path.join(part.path, "bin", "python"), "-m", "pip", "freeze", "--local"],
                            capture_output=True, text=True, check=True).stdout
    with open(os.path.join(part.path, "freeze.txt"), "w") as f:
        f.write(freeze)
    part.done()


FORK_MODEL_INPUTS = ("tests/realhost/make_fork_models.py", "tests/realhost/make_models.py", "tests/tiny_models.py", "ssr/weights.py", "ssr/layers.py",
                     "ssr/subject_encoder.py")


def fork_models_part(venv: Part, webui: Part) -> Part:
    return Part("fork-models", digest("fork-models-v1", venv.key, webui.key,
                                      [sha256_file(os.path.join(REPO, p)) for p in FORK_MODEL_INPUTS]))


def build_fork_models(part: Part, venv: Part, webui: Part) -> None:
    part.begin()
    log(f"writing the forks' random SD1.5 models into {part.path}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([
        REPO, webui.path, os.path.join(webui.path, "repositories", "stable-diffusion-stability-ai")]))
    subprocess.run([os.path.join(venv.path, "bin", "python"), os.path.join(HERE, "make_fork_models.py"), part.path],
                   check=True, env=env, cwd=REPO)
    part.done()


def build_forks(info: dict, check_only: bool = False) -> dict:
    webui, venv = webui_part(), venv_part(webui_part())
    models = fork_models_part(venv, webui)
    if not models.current():
        if check_only:
            raise SystemExit(1)
        build_fork_models(models, venv, webui)
    info["fork_models"] = models.path
    for name in FORKS:
        fork = fork_part(name)
        if not fork.current():
            if check_only:
                raise SystemExit(1)
            build_fork(fork, name)
        fvenv = fork_venv_part(name, fork, venv)
        if not fvenv.current():
            if check_only:
                raise SystemExit(1)
            build_fork_venv(fvenv, name, fork, venv)
        info[name] = {"root": fork.path, "python": os.path.join(fvenv.path, "bin", "python")}
    return info


def build(check_only: bool = False, forks: bool = False) -> dict:
    os.makedirs(CACHE, exist_ok=True)
    t0 = time.time()
    webui = webui_part()
    if not webui.current():
        if check_only:
            raise SystemExit(1)
        build_webui(webui)
    venv = venv_part(webui)
    if not venv.current():
        if check_only:
            raise SystemExit(1)
        build_venv(venv, webui)
    models = models_part(venv, webui)
    if not models.current():
        if check_only:
            raise SystemExit(1)
        build_models(models, venv, webui)
    browser = browser_part()
    if not browser.current():
        if check_only:
            raise SystemExit(1)
        build_browser(browser)
    info = {"cache": CACHE, "webui": webui.path, "python": os.path.join(venv.path, "bin", "python"),
            "models": models.path, "controlnet": os.path.join(webui.path, "_bundled_extensions", "sd-webui-controlnet"),
            "browser_python": os.path.join(browser.path, "bin", "python")}
    with open(os.path.join(CACHE, "host.json"), "w") as f:
        json.dump(info, f, indent=1)
    if forks:
        info = build_forks(dict(info), check_only)
        with open(os.path.join(CACHE, "forks.json"), "w") as f:
            json.dump(info, f, indent=1)
    log(f"ready in {time.time() - t0:.0f} s: {json.dumps(info)}")
    return info


# --------------------------------------------------------------------------- per-session data

def clone_extension(dest: str, source: str = REPO) -> str:
    """``git clone`` the checkout under test into ``dest`` as a user installs it. Uncommitted
    changes of tracked files and untracked, not ignored files are carried over on top, so a
    developer tests what is in the working tree (CI's clean clone has none)."""
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", source, dest], check=True)
    diff = subprocess.run(["git", "-C", source, "diff", "HEAD", "--binary"], capture_output=True, check=True).stdout
    if diff.strip():
        subprocess.run(["git", "-C", dest, "apply", "--whitespace=nowarn"], input=diff, check=True)
    untracked = subprocess.run(["git", "-C", source, "ls-files", "--others", "--exclude-standard", "-z"],
                               capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, untracked):
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copy2(os.path.join(source, rel), os.path.join(dest, rel))
    return dest


def make_data_dir(dest: str, info: dict, controlnet: bool = True, extension_name: str = EXTENSION_NAME) -> str:
    """A WebUI ``--data-dir``: extensions/ (this extension cloned, ControlNet copied), models/
    (links to the cached tiny models), ControlNet's annotator models folder (the CLIP vision
    weights its IP-Adapter preprocessors read), and a config.json with test-friendly settings.

    ``extension_name`` is the folder the extension is cloned into: the WebUI loads extension
    scripts in the order of their folder names, so it decides whether this extension's script
    runs before ControlNet's (e.g. ``00-ssr-encoder``) or after it (the default)."""
    ext = os.path.join(dest, "extensions")
    os.makedirs(ext, exist_ok=True)
    clone_extension(os.path.join(ext, extension_name))
    if controlnet:
        shutil.copytree(info["controlnet"], os.path.join(ext, "sd-webui-controlnet"), symlinks=True)
    models = os.path.join(dest, "models")
    os.makedirs(models, exist_ok=True)
    for entry in os.listdir(info["models"]):
        if entry.startswith("_"):
            continue
        os.symlink(os.path.join(info["models"], entry), os.path.join(models, entry))
    annotator = os.path.join(dest, "annotator")  # ControlNet's preprocessor models (it may write there)
    cached_annotator = os.path.join(info["models"], "_annotator")
    for root, _dirs, files in os.walk(cached_annotator):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), cached_annotator)
            os.makedirs(os.path.dirname(os.path.join(annotator, rel)), exist_ok=True)
            os.symlink(os.path.join(cached_annotator, rel), os.path.join(annotator, rel))
    os.makedirs(annotator, exist_ok=True)
    config = {
        "sd_model_checkpoint": "tiny_sd1.safetensors",
        "live_previews_enable": False,  # no VAE-approx download at the first step
        "show_progress_every_n_steps": -1,
        "samples_save": False, "grid_save": False, "save_images_add_number": False,
        "enable_pnginfo": True, "sd_checkpoint_hash": "",
        "control_net_model_cache_size": 2,
        "control_net_modules_path": annotator,
    }
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return dest


def host_env(info: dict, data_dir: str) -> dict:
    """Environment for anything running in the WebUI venv: offline, HF cache inside the data dir."""
    env = dict(os.environ)
    for k in list(env):
        if k.startswith(("PYTHON", "VIRTUAL_ENV")):
            env.pop(k)
    env.update({"HF_HOME": os.path.join(data_dir, "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false",
                "PATH": os.path.dirname(info["python"]) + os.pathsep + env.get("PATH", ""),
                "VIRTUAL_ENV": os.path.dirname(os.path.dirname(info["python"]))})
    return env


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 unless everything is built and current")
    ap.add_argument("--forks", action="store_true", help="also Forge and reForge (writes forks.json)")
    args = ap.parse_args()
    build(check_only=args.check, forks=args.forks)


def die_with_parent() -> None:
    """``preexec_fn`` for servers a test starts: the kernel kills the child when the test
    process dies, even by SIGKILL (the out-of-memory killer, a CI timeout), so no WebUI
    keeps its port and gigabytes of memory after the run that started it (Linux prctl)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the tests' own cleanup still stops it
        pass
