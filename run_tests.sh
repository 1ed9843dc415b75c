#!/usr/bin/env bash
# Set up (pip install, no-op when already installed) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
MPLBACKEND=Agg python3 -m pytest -q -p no:cacheprovider tests "$@"
