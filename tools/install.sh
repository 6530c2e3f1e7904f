#!/usr/bin/env bash
# Install apla_mm and its pinned OpenMMLab toolchain into a virtual environment.
#
#   bash tools/install.sh                      # newest tested torch (2.13.0) into ./.venv
#   APLA_TORCH=2.1.2 bash tools/install.sh     # torch 2.1.2 (the era of OpenMMLab's
#                                              # prebuilt mmcv wheels) into ./.venv-torch2.1
#   bash tools/install.sh --wheelhouse DIR     # offline, from a folder that
#                                              # tools/make_wheelhouse.sh filled
#
# Idempotent: each step checks what is already there and skips it, so a second
# run takes seconds. mmcv 2.1.0 is built with its compiled ops from source
# (~5 min on 2 cores, CPU ops) unless a wheel built against the *same* torch,
# CUDA and Python is in the mmcv wheel cache (below): a wheel is never reused
# across torch builds, whose C++ ABI differs.
#
# Environment knobs:
#   APLA_TORCH=2.13.0|2.1.2   the stack (default 2.13.0); the pins of each are in
#                             tools/constraints/torch-<version>.txt
#   APLA_VENV=path            where the venv lives (default: .venv for 2.13.0,
#                             .venv-torch2.1 for 2.1.2)
#   PYTHON=python3.11         interpreter used to create the venv
#   APLA_KEEP_TORCH=1         keep the torch/torchvision already in the venv (CUDA
#                             users: install your own torch first, see README.md)
#   APLA_MMCV_FIND_LINKS=URL  take a prebuilt mmcv 2.1.0 from this pip find-links
#                             page (OpenMMLab's, for torch 2.1 + CUDA) instead of
#                             building it
#   APLA_MMCV_CACHE=dir       where built mmcv wheels are kept, one folder per
#                             (Python, torch, CUDA, ops) key
#                             (default: ~/.cache/apla_mm/mmcv)
#   FORCE_CUDA=1              build mmcv's CUDA kernels (nvcc must match torch's
#                             CUDA); TORCH_CUDA_ARCH_LIST narrows the build
#   MAX_JOBS=N                parallel compile jobs for mmcv (default: nproc)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELHOUSE=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheelhouse) WHEELHOUSE="$(cd "$2" && pwd)"; shift 2 ;;
    --wheelhouse=*) WHEELHOUSE="$(cd "${1#*=}" && pwd)"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf '\033[1m[apla_mm install]\033[0m %s\n' "$*"; }
die() { printf '\033[1m[apla_mm install]\033[0m error: %s\n' "$*" >&2; exit 1; }

TORCH_VERSION="${APLA_TORCH:-2.13.0}"
CONSTRAINTS="$ROOT/tools/constraints/torch-$TORCH_VERSION.txt"
[[ -f "$CONSTRAINTS" ]] || die "APLA_TORCH=$TORCH_VERSION is not a tested stack; choose one of: $(
  cd "$ROOT/tools/constraints" && ls torch-*.txt | sed 's/^torch-//; s/\.txt$//' | tr '\n' ' ')"
case "$TORCH_VERSION" in
  2.13.0) DEFAULT_VENV="$ROOT/.venv" ;;
  *) DEFAULT_VENV="$ROOT/.venv-torch${TORCH_VERSION%.*}" ;;
esac
VENV="${APLA_VENV:-$DEFAULT_VENV}"
PYTHON="${PYTHON:-python3}"
MMCV_VERSION="2.1.0"
MMCV_CACHE="${APLA_MMCV_CACHE:-$HOME/.cache/apla_mm/mmcv}"

if [[ -n "$WHEELHOUSE" ]] && [[ ! -f "$WHEELHOUSE/requirements.txt" ]]; then
  die "$WHEELHOUSE has no requirements.txt: make the folder with tools/make_wheelhouse.sh"
fi

# The interpreter the venv has (or will have) must suit the stack.
PYBIN="$VENV/bin/python"
[[ -x "$PYBIN" ]] || PYBIN="$PYTHON"
PYV=$("$PYBIN" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') ||
  die "cannot run $PYBIN (set PYTHON=python3.11 or another interpreter)"
case "$PYV" in
  3.10|3.11|3.12) ;;
  *) die "Python $PYV is not supported (3.10-3.12); choose one with PYTHON=python3.12 (or remove $VENV if it was made with another)" ;;
esac
if [[ "$TORCH_VERSION" == "2.1.2" && "$PYV" == "3.12" && -z "$WHEELHOUSE" ]]; then
  die "torch 2.1.2 has no wheels for Python 3.12; use PYTHON=python3.11 (or 3.10) for APLA_TORCH=2.1.2"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# --isolated: ignore machine-wide pip configuration. Some machines point pip at
# a local CPU-only torch wheel that PyPI's torchvision cannot load
# ("operator torchvision::nms does not exist"); PyPI's own torch build runs on
# CPU-only machines as well. Offline, every install reads only the wheelhouse.
PIP=(python -m pip --isolated --disable-pip-version-check)
if [[ -n "$WHEELHOUSE" ]]; then
  PIP+=(--no-input)
  pip_install() { "${PIP[@]}" install --no-index --find-links "$WHEELHOUSE" "$@"; }
else
  pip_install() { "${PIP[@]}" install "$@"; }
fi
# Checks run from / so that the checkout itself is not importable as `apla_mm`.
py_ok() { (cd / && python -c "$1") >/dev/null 2>&1; }

# 1. torch + torchvision. Offline, the target's own torch is used.
if [[ -n "$WHEELHOUSE" ]]; then
  log "installing the wheelhouse's packages ($(grep -c . "$WHEELHOUSE/requirements.txt") pinned, no dependency resolution, no network)"
  pip_install --no-deps -r "$WHEELHOUSE/requirements.txt"
  py_ok "import torch, torchvision.ops" || die "no working torch/torchvision in $VENV: install the target's own torch and torchvision into it first (wheelhouses leave them out)"
elif [[ "${APLA_KEEP_TORCH:-0}" == "1" ]] && py_ok "import torch, torchvision.ops"; then
  log "keeping installed torch $(python -c 'import torch; print(torch.__version__)')"
elif py_ok "import torch, torchvision.ops, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')"; then
  log "torch $TORCH_VERSION already installed"
else
  log "installing torch $TORCH_VERSION (pins: ${CONSTRAINTS#"$ROOT/"})"
  pip_install -c "$CONSTRAINTS" torch torchvision numpy
fi

# 2. build tools for mmcv: setup.py imports pkg_resources (gone in setuptools>=81).
if ! py_ok "import pkg_resources, wheel, numpy, ninja, setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) >= 81)"; then
  log "installing build tools (setuptools<81, wheel, numpy, ninja)"
  pip_install -c "$CONSTRAINTS" "setuptools>=69,<81" wheel numpy ninja
fi

# 3. mmcv's own requirements (offline, the wheelhouse brought them), then mmcv
#    itself, installed without them.
if [[ -z "$WHEELHOUSE" ]] && ! py_ok "import mmengine, addict, yapf, cv2, yaml, PIL, packaging"; then
  log "installing mmengine and mmcv's other requirements"
  pip_install -c "$CONSTRAINTS" mmengine addict packaging Pillow pyyaml yapf opencv-python
fi

# 4. mmcv with compiled ops, built against the torch above. The key names
#    everything the compiled ops depend on; a venv records the key of its mmcv.
MMCV_KEY=$(python - <<'PY'
import os, sys, torch
# mmcv's setup.py compiles CUDA ops under the same condition
cuda_ops = os.environ.get('FORCE_CUDA') == '1' or torch.cuda.is_available()
ops = 'cuda-' + (os.environ.get('TORCH_CUDA_ARCH_LIST') or 'auto').replace(' ', '_').replace(';', '_') \
    if cuda_ops else 'cpu'
print(f"cp{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
      f"-cuda{torch.version.cuda or 'none'}-ops_{ops}")
PY
)
KEY_FILE="$VENV/.apla_mm-mmcv-key"
mmcv_ok() {
  py_ok "import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != '$MMCV_VERSION')" &&
    [[ "$(cat "$KEY_FILE" 2>/dev/null)" == "$MMCV_KEY" ]]
}
if mmcv_ok; then
  log "mmcv $MMCV_VERSION with ops already installed ($MMCV_KEY)"
elif [[ -n "${APLA_MMCV_FIND_LINKS:-}" ]]; then
  log "installing prebuilt mmcv $MMCV_VERSION from $APLA_MMCV_FIND_LINKS"
  pip_install --no-deps --force-reinstall --find-links "$APLA_MMCV_FIND_LINKS" "mmcv==$MMCV_VERSION"
  echo "$MMCV_KEY" > "$KEY_FILE"
else
  CACHED=$(ls "$MMCV_CACHE/$MMCV_KEY"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [[ -z "$CACHED" ]]; then
    log "building mmcv $MMCV_VERSION with compiled ops for $MMCV_KEY (~5 min on 2 cores for CPU ops)"
    BUILD_DIR=$(mktemp -d)
    # Python's default flags add -g (debug info): -g0 compiles about a quarter
    # faster. A CFLAGS variable replaces the defaults, hence the full set.
    # --no-cache-dir: pip's own wheel cache names the wheel without the torch
    # it was built against and would hand back a build for another torch.
    CFLAGS="${CFLAGS:--O2 -g0 -DNDEBUG -fwrapv}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "${PIP[@]}" wheel --no-build-isolation --no-deps --no-cache-dir -w "$BUILD_DIR" \
      ${WHEELHOUSE:+--no-index --find-links "$WHEELHOUSE"} "mmcv==$MMCV_VERSION"
    mkdir -p "$MMCV_CACHE/$MMCV_KEY"
    mv "$BUILD_DIR"/mmcv-*.whl "$MMCV_CACHE/$MMCV_KEY/"
    rm -rf "$BUILD_DIR"
    CACHED=$(ls "$MMCV_CACHE/$MMCV_KEY"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)
  else
    log "mmcv $MMCV_VERSION for $MMCV_KEY from the wheel cache ($CACHED)"
  fi
  "${PIP[@]}" install --no-index --no-deps --force-reinstall "$CACHED"
  echo "$MMCV_KEY" > "$KEY_FILE"
fi
if ! err=$(python -c "import mmcv.ops" 2>&1); then
  die "mmcv's compiled ops do not load ($(tail -n1 <<< "$err")); remove $KEY_FILE and rerun to rebuild them"
fi

# 5. the rest of the stack and apla_mm itself (editable, with test extras).
if py_ok "import apla_mm, mmseg, mmdet, timm, pytest, xdist, torchvision.ops, transformers, segment_anything, open_clip"; then
  log "apla_mm and the OpenMMLab stack already installed"
elif [[ -n "$WHEELHOUSE" ]]; then
  log "installing apla_mm (editable) from the checkout"
  pip_install --no-deps --no-build-isolation -e "$ROOT"
else
  log "installing mmengine, mmsegmentation, mmdet, timm and apla_mm (editable)"
  pip_install -c "$CONSTRAINTS" --no-build-isolation -e "$ROOT[dev]"
fi

cd /
python - <<'PY'
import torch, torchvision, mmcv, mmengine, mmseg, mmdet, timm, sys
import torchvision.ops, mmcv.ops  # noqa: F401  (compiled ops must import)
import apla_mm
print(f"[apla_mm install] ok: Python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, "
      f"mmseg {mmseg.__version__}, mmdet {mmdet.__version__}, timm {timm.__version__}, apla_mm {apla_mm.__version__}")
PY
log "activate with: source ${VENV}/bin/activate"
