#!/usr/bin/env bash
# Build (or reuse) the real WebUI v1.10.1 + sd-webui-controlnet host and run the real-host suite
# in the WebUI's own venv. Extra arguments go to pytest, e.g. `bash tests/realhost/run.sh -k rows`.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 tests/realhost/build_host.py
PY="$(python3 -c 'import json,sys; sys.path.insert(0,"tests/realhost"); import build_host; print(json.load(open(build_host.CACHE+"/host.json"))["python"])')"
SSR_REALHOST=1 "$PY" -m pytest tests/realhost -q -p no:cacheprovider --durations=8 "$@"
