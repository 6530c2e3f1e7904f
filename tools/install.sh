#!/usr/bin/env bash
# Install apla_mm and its pinned OpenMMLab toolchain into a virtual environment.
#
#   bash tools/install.sh            # creates ./.venv (or $APLA_VENV)
#
# Idempotent: each step checks what is already there and skips it, so a second
# run takes seconds. The first run builds mmcv 2.1.0 with its compiled ops from
# source (~20 min on 2 cores); pip caches the wheel for later installs.
#
# Environment knobs:
#   APLA_VENV=path      where the venv lives (default: .venv in the repo root)
#   PYTHON=python3.11   interpreter used to create the venv
#   APLA_KEEP_TORCH=1   keep the torch/torchvision already in the venv (CUDA
#                       users: install your own torch first, see README.md)
#   MAX_JOBS=N          parallel compile jobs for mmcv (default: nproc)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${APLA_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

TORCH_PIN="torch==2.13.0"
TORCHVISION_PIN="torchvision==0.28.0"
MMCV_PIN="mmcv==2.1.0"

log() { printf '\033[1m[apla_mm install]\033[0m %s\n' "$*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# --isolated: ignore machine-wide pip configuration. Some machines point pip at
# a local CPU-only torch wheel that PyPI's torchvision cannot load
# ("operator torchvision::nms does not exist"); PyPI's own torch build runs on
# CPU-only machines as well.
pip_install() { python -m pip --isolated --disable-pip-version-check install "$@"; }
py_ok() { python -c "$1" >/dev/null 2>&1; }

# 1. torch + torchvision, pinned: mmcv 2.1.0 compiles as C++17, which newer
#    torch headers (C++20) reject.
if [[ "${APLA_KEEP_TORCH:-0}" == "1" ]] && py_ok "import torch, torchvision.ops"; then
  log "keeping installed torch $(python -c 'import torch; print(torch.__version__)')"
elif py_ok "import torch, torchvision.ops, sys; sys.exit(not (torch.__version__.startswith('2.13.0') and torchvision.__version__.startswith('0.28.0')))"; then
  log "torch 2.13.0 / torchvision 0.28.0 already installed"
else
  log "installing $TORCH_PIN $TORCHVISION_PIN"
  pip_install "$TORCH_PIN" "$TORCHVISION_PIN"
fi

# 2. build tools for mmcv: setup.py imports pkg_resources (gone in setuptools>=81).
if ! py_ok "import pkg_resources, wheel, numpy, ninja, setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) >= 81)"; then
  log "installing build tools (setuptools<81, wheel, numpy, ninja)"
  pip_install "setuptools>=77,<81" wheel numpy ninja
fi

# 3. mmcv with compiled ops, built against the torch above.
if py_ok "import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != '2.1.0')"; then
  log "mmcv 2.1.0 with ops already installed"
else
  log "building $MMCV_PIN with compiled ops (first time ~20 min; cached afterwards)"
  # Python's default flags add -g (debug info): -g0 compiles about a quarter
  # faster. A CFLAGS variable replaces the defaults, hence the full set.
  CFLAGS="${CFLAGS:--O2 -g0 -DNDEBUG -fwrapv}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    pip_install --no-build-isolation "$MMCV_PIN"
  python -c "import mmcv.ops" || { log "mmcv built without its ops (mmcv._ext missing)"; exit 1; }
fi

# 4. the rest of the stack and apla_mm itself (editable, with test extras).
if py_ok "import apla_mm, mmseg, mmdet, timm, pytest, xdist, torchvision.ops"; then
  log "apla_mm and the OpenMMLab stack already installed"
else
  log "installing mmengine, mmsegmentation, mmdet, timm and apla_mm (editable)"
  pip_install --no-build-isolation -e "$ROOT[dev]"
fi

python - <<'PY'
import torch, torchvision, mmcv, mmengine, mmseg, mmdet, timm
import torchvision.ops, mmcv.ops  # noqa: F401  (compiled ops must import)
import apla_mm
print(f"[apla_mm install] ok: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, mmseg {mmseg.__version__}, "
      f"mmdet {mmdet.__version__}, timm {timm.__version__}, apla_mm {apla_mm.__version__}")
PY
log "activate with: source ${VENV}/bin/activate"
