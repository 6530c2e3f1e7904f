#!/usr/bin/env bash
# The whole GPU check on a CUDA machine without network, in one command
# (docs/gpu.md): a venv over the machine's own torch, apla_mm's stack from a
# wheelhouse, mmcv built from its source archive, tools/gpu_report.py, and
# the report copied to an output folder.
#
#   bash tools/gpu_check.sh [--wheelhouse DIR] [--out DIR] [--detection] [-- REPORT ARGS...]
#   # on a machine with network, first (cp312 wheels, without what the GPU
#   # machine brings; see tools/constraints/gpu-machine-excludes.txt):
#   bash tools/gpu_check.sh --make-wheelhouse DIR [--python 3.12]
#
# Options:
#   --wheelhouse DIR   made by --make-wheelhouse (default .ci-offline/gpu/wheelhouse)
#   --out DIR          where report.md, report.json, build.json and the logs go
#                      (default: $OUT if set, else work_dirs/gpu_check)
#   --detection        build mmcv's CUDA ops for this GPU's architecture only
#                      (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability)
#                      and add the Mask R-CNN section; without it mmcv gets CPU
#                      ops (all UperNet needs: mmseg imports mmcv.ops), ~1 min
#   -- ARGS            passed on to tools/gpu_report.py (e.g. -- --quick)
# Environment: PYTHON (the interpreter that has the machine's torch; default
# python3), APLA_GPU_VENV (default .venv-gpu; the PYTHON's own prefix when it is
# a venv already), GPU_CHECK_BUDGET (seconds for everything, default 570: the
# report skips what would not fit).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$SECONDS
WH="$ROOT/.ci-offline/gpu/wheelhouse"
OUTDIR="${OUT:-$ROOT/work_dirs/gpu_check}"
DETECTION=0
MAKE=""
PYVER="3.12"
REPORT_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheelhouse) WH="$2"; shift 2 ;;
    --out) OUTDIR="$2"; shift 2 ;;
    --detection) DETECTION=1; shift ;;
    --make-wheelhouse) MAKE="$2"; shift 2 ;;
    --python) PYVER="$2"; shift 2 ;;
    --) shift; REPORT_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
log() { printf '[gpu_check %4d s] %s\n' "$(( SECONDS - START ))" "$*"; }
die() { printf '[gpu_check] error: %s\n' "$*" >&2; exit 1; }

if [[ -n "$MAKE" ]]; then
  EXCLUDES=()
  while read -r name _; do
    [[ -z "$name" || "$name" == \#* ]] || EXCLUDES+=(--exclude "$name")
  done < "$ROOT/tools/constraints/gpu-machine-excludes.txt"
  bash "$ROOT/tools/make_wheelhouse.sh" "$MAKE" --python "$PYVER" "${EXCLUDES[@]}"
  log "wheelhouse: $(du -sb "$MAKE" | cut -f1) bytes (the device tool carries at most 64 MiB = 67108864)"
  exit 0
fi

[[ -f "$WH/requirements.txt" ]] || die "no wheelhouse at $WH: make one with 'bash tools/gpu_check.sh --make-wheelhouse $WH' on a machine with network and bring it along"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
"$PY" -c 'import torch' 2>/dev/null || die "$PY cannot import torch: set PYTHON to the interpreter that has the machine's torch"
log "machine: $("$PY" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")')"

# 1. a venv that sees the machine's packages (torch, torchvision, timm, cv2 ...)
if "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  VENV="${APLA_GPU_VENV:-$("$PY" -c 'import sys; print(sys.prefix)')}"
else
  VENV="${APLA_GPU_VENV:-$ROOT/.venv-gpu}"
  if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv --system-site-packages "$VENV" 2>/dev/null ||
      "$PY" -m venv --system-site-packages --without-pip "$VENV"  # no ensurepip: the machine's pip serves
  fi
fi
VPY="$VENV/bin/python"
"$VPY" -m pip --version >/dev/null || die "no pip for $VPY"

# 2. the wheelhouse's pins the machine does not have yet (its own numpy,
#    timm, ... stay); everything else install.sh does offline
FILTERED="$ROOT/.ci-offline/gpu/filtered"
rm -rf "$FILTERED"; mkdir -p "$FILTERED"
for f in "$WH"/*; do ln -s "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$FILTERED/"; done
rm "$FILTERED/requirements.txt"
"$VPY" - "$WH/requirements.txt" > "$FILTERED/requirements.txt" <<'PY'
import sys
from importlib import metadata
for line in open(sys.argv[1]):
    pin = line.strip()
    if not pin:
        continue
    name = pin.split('==')[0]
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(pin)
        continue
    print(f'[gpu_check] keeping the machine\'s {name} {version} (wheelhouse: {pin})', file=sys.stderr)
PY
"$VPY" - <<'PY' || die "the machine lacks a package the wheelhouse leaves out (tools/constraints/gpu-machine-excludes.txt): add it to the wheelhouse"
import importlib.util, sys
from importlib import metadata
# the imports of apla_mm's stack that the wheelhouse leaves to the machine
missing = [m for m in ('torch', 'torchvision', 'numpy', 'PIL', 'cv2', 'yaml', 'tqdm', 'packaging', 'regex',
                       'safetensors', 'huggingface_hub', 'scipy', 'matplotlib', 'rich', 'six', 'wheel', 'ninja')
           if importlib.util.find_spec(m) is None]
import re
timm = metadata.version('timm') if importlib.util.find_spec('timm') else None
if timm is None or tuple(map(int, re.findall(r'\d+', timm)[:3])) < (1, 0, 15):
    missing.append(f'timm>=1.0.15 (found {timm})')
if missing:
    sys.exit(f'[gpu_check] missing on this machine: {missing}')
PY

if [[ "$DETECTION" == 1 ]]; then
  ARCH=$("$VPY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  OPS="cuda $ARCH"
  BUILD_ENV=(FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH")
  REPORT_ARGS+=(--detection)
else
  OPS="cpu"
  BUILD_ENV=(CUDA_VISIBLE_DEVICES= FORCE_CUDA=0)  # mmcv's setup.py builds CUDA ops whenever it sees a GPU
fi
log "installing (mmcv ops: $OPS)"
INSTALL_START=$SECONDS
set +e
env "${BUILD_ENV[@]}" APLA_VENV="$VENV" MAX_JOBS="$(nproc)" bash tools/install.sh --wheelhouse "$FILTERED" 2>&1 |
  while IFS= read -r line; do printf '%d %s\n' "$(( SECONDS - START ))" "$line"; done > "$OUTDIR/install.log"
STATUS=${PIPESTATUS[0]}
set -e
if [[ $STATUS != 0 && "$DETECTION" == 1 ]]; then
  log "mmcv with CUDA ops failed to build (install.log); CPU ops instead, detection will say so"
  mv "$OUTDIR/install.log" "$OUTDIR/install-cuda-failed.log"
  OPS="cpu (CUDA build failed)"
  env CUDA_VISIBLE_DEVICES= FORCE_CUDA=0 APLA_VENV="$VENV" MAX_JOBS="$(nproc)" bash tools/install.sh --wheelhouse "$FILTERED" 2>&1 |
    while IFS= read -r line; do printf '%d %s\n' "$(( SECONDS - START ))" "$line"; done > "$OUTDIR/install.log"
  STATUS=${PIPESTATUS[0]}
fi
[[ $STATUS == 0 ]] || { tail -n 30 "$OUTDIR/install.log" >&2; die "install failed (see $OUTDIR/install.log)"; }
INSTALL_S=$(( SECONDS - INSTALL_START ))
"$VPY" - "$OUTDIR/install.log" "$OUTDIR/build.json" "$INSTALL_S" "$OPS" "${TORCH_CUDA_ARCH_LIST:-${ARCH:-}}" <<'PY'
import json, sys
log, out, install_s, ops, arch = sys.argv[1:]
lines = [l.split(' ', 1) for l in open(log) if ' ' in l]
marks = [(int(t), text) for t, text in lines if '[apla_mm install]' in text]
mmcv, source = None, 'already installed'
for i, (t, text) in enumerate(marks):
    if 'building mmcv' in text and i + 1 < len(marks):
        mmcv, source = marks[i + 1][0] - t, 'built from mmcv-2.1.0.tar.gz'
    elif 'from the wheel cache' in text:
        source = 'a wheel built earlier for the same Python, torch, CUDA and ops'
json.dump({'install_s': int(install_s), 'mmcv_build_s': mmcv, 'mmcv': source,
           'mmcv_ops': ops, 'torch_cuda_arch_list': arch or None}, open(out, 'w'))
print(f'[gpu_check] install {install_s} s; mmcv: {source}'
      + (f' in {mmcv} s' if mmcv is not None else '') + f' (ops: {ops})')
PY

# 3. the report, within what is left of the budget
BUDGET=$(( ${GPU_CHECK_BUDGET:-570} - (SECONDS - START) - 15 ))
log "tools/gpu_report.py, budget $BUDGET s"
set +e
OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" "$VPY" tools/gpu_report.py --out "$ROOT/work_dirs/gpu_check_report" \
  --build-info "$OUTDIR/build.json" --time-budget "$BUDGET" "${REPORT_ARGS[@]}" > "$OUTDIR/report.log" 2>&1
RC=$?
set -e
for f in report.md report.json; do cp "$ROOT/work_dirs/gpu_check_report/$f" "$OUTDIR/" 2>/dev/null || true; done
for f in "$ROOT"/work_dirs/gpu_check_report/amp/*/amp_probe.json; do
  [[ -f "$f" ]] && cp "$f" "$OUTDIR/$(basename "$(dirname "$f")")_amp_probe.json"
done
tail -n 40 "$OUTDIR/report.log"
log "done (report exit code $RC): $OUTDIR"
exit $RC
