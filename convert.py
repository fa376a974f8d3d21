"""Weight converter, runnable from anywhere, e.g. from the WebUI folder:

    python extensions/sd-webui-ssr-encoder/convert.py models/ssr_encoder/ssr_release -o models/ssr_encoder/ssr_sd15.safetensors

It puts this extension's folder on ``sys.path`` and runs ``ssr.convert`` (see
``python extensions/sd-webui-ssr-encoder/convert.py --help``). The WebUI imports only
``scripts/*.py``, so this file is never loaded by the WebUI itself.
"""
import os
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from ssr.convert import main
    from ssr.files import CONVERT_COMMAND

    sys.exit(main(prog=CONVERT_COMMAND))
