#!/usr/bin/env bash
# The offline install, end to end, as on a GPU cluster whose nodes reach no
# package index:
#   1. tools/make_wheelhouse.sh for Python X.Y, here (network);
#   2. a fresh venv of that Python with its own torch 2.13.0 (the target's);
#   3. tools/install.sh --wheelhouse inside a network namespace that has no
#      network at all (`unshare -n`: any download attempt fails);
#   4. a smoke test in that venv: the install check, the compat shims and
#      the APLA drop-in through mmseg's own tools/train.py.
#
#   bash .ci/offline_install.sh 3.12.1     # a pyenv version, or a python path
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WANT="${1:-3.12.1}"
if [[ -x "$WANT" ]]; then PY="$WANT"; else PY="$(pyenv root)/versions/$WANT/bin/python"; fi
[[ -x "$PY" ]] || { echo "offline_install.sh: no interpreter $WANT" >&2; exit 2; }
XY=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
WORK="$ROOT/.ci-offline/py$XY"
rm -rf "$WORK"
mkdir -p "$WORK"

timed() {  # timed NAME COMMAND...
  local name="$1" start=$SECONDS
  shift
  "$@"
  echo "[offline] $name took $(( SECONDS - start )) s"
}
timed "make_wheelhouse.sh (Python $XY)" bash tools/make_wheelhouse.sh "$WORK/wheelhouse" --python "$XY"
"$PY" -m venv "$WORK/venv"
timed "the target's own torch (online)" "$WORK/venv/bin/python" -m pip --isolated \
  --disable-pip-version-check install --quiet -c tools/constraints/torch-2.13.0.txt torch torchvision
echo "[offline] installing without network (unshare -n)"
timed "install.sh --wheelhouse (no network)" \
  unshare -n env APLA_VENV="$WORK/venv" bash tools/install.sh --wheelhouse "$WORK/wheelhouse"
cd "$ROOT"
timed "smoke test" "$WORK/venv/bin/python" -m pytest -n 2 tests/test_install.py tests/test_compat.py tests/test_dropin.py
