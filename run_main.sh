#!/usr/bin/env bash
# Set up (pip install, no-op when already installed) and run the main MNIST job, quick profile.
# Pass -profile report for the report's settings.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
python3 mnist_test/run_pipeline.py "$@"
