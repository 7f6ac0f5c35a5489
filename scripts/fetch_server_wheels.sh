#!/usr/bin/env bash
# The GPU node has no fastapi / uvicorn and no package index: download their wheels (Python 3.12,
# x86-64) into .whl/ (git-ignored), then pass `carry: [".whl"]` to the device call and start the
# command with: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for wheel in fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 typing-extensions==4.16.0 annotated-types \
             typing-inspection h11 click anyio annotated-doc opentelemetry-api==1.45.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$wheel"
done
ls .whl
