"""The real-host suite (tests/realhost) runs in the WebUI's own Python 3.10 venv, started by
``.ci/run`` (or ``bash tests/realhost/run.sh``) with SSR_REALHOST=1; the development venv
(.venv) runs everything else."""
import os

collect_ignore = [] if os.environ.get("SSR_REALHOST") == "1" else ["realhost", "realhost_forks"]
