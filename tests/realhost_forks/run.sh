#!/usr/bin/env bash
# Build (or reuse) Forge and reForge from the source bundles (layered on the WebUI's venv) and
# run tests/realhost_forks in each fork's own venv. Extra arguments go to pytest; SSR_FORKS
# chooses the forks (default "reforge forge"), e.g. `SSR_FORKS=reforge bash tests/realhost_forks/run.sh -k plain`.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 tests/realhost/build_host.py --forks
for fork in ${SSR_FORKS:-reforge forge}; do
  PY="$(python3 -c 'import json,sys; sys.path.insert(0,"tests/realhost"); import build_host; print(json.load(open(build_host.CACHE+"/forks.json"))[sys.argv[1]]["python"])' "$fork")"
  echo "[realhost_forks] $fork"
  SSR_REALHOST=1 SSR_FORK="$fork" "$PY" -m pytest tests/realhost_forks -q -p no:cacheprovider --durations=8 "$@"
done
