#!/usr/bin/env bash
# Build the distributables with `python -m build`: one pure-Python wheel that runs on every
# target the seed names (amd64, arm64, armv7), since vesta has no compiled code of its own, and an sdist.
# Install on a machine with:  pip install dist/vesta-*.whl   (or: pipx install dist/vesta-*.whl)
# Builds without network access: the build tools come from .venv (scripts/setup installs them).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup
rm -rf dist build
.venv/bin/python -m build --no-isolation --sdist --wheel --outdir dist . >/dev/null
ls -l dist
