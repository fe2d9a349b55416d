#!/usr/bin/env bash
# Build the distributable: one pure-Python wheel (and an sdist) that runs on every
# target the seed names (amd64, arm64, armv7), since vesta has no compiled code of its own.
# Install on a machine with:  pip install dist/vesta-*.whl   (or: pipx install dist/vesta-*.whl)
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup
rm -rf dist build
.venv/bin/python -m pip wheel --no-deps -q -w dist . >/dev/null
ls -l dist
