"""Run by the WebUI at every launch (unless --skip-install): install only what is missing.

Everything SSR-Encoder needs ships with the WebUI v1.10.1 itself; the pins below are the
WebUI's own, used only if a package is absent (a trimmed or custom install). A package that
is present is never touched, so the WebUI's versions are never up- or downgraded.
"""
import launch

# import name -> pip requirement (the WebUI v1.10.1 pins)
REQUIREMENTS = {
    "open_clip": "open-clip-torch==2.20.0",
    "safetensors": "safetensors==0.4.2",
}

for module_name, requirement in REQUIREMENTS.items():
    if not launch.is_installed(module_name):
        launch.run_pip(f"install {requirement}", f"{requirement} for SSR-Encoder")
