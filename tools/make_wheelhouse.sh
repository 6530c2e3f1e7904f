#!/usr/bin/env bash
# Collect everything apla_mm needs into one folder, for an install without
# network (GPU clusters whose compute nodes reach no index):
#
#   bash tools/make_wheelhouse.sh DIR [--python 3.12] [--stack 2.13.0] [--exclude NAME]...
#   # copy DIR and this checkout to the target, then there:
#   bash tools/install.sh --wheelhouse DIR
#
# Runs on a machine with network. DIR receives binary wheels for the target's
# Python version and manylinux x86_64 (whatever the Python running this
# script), the mmcv 2.1.0 source archive (install.sh builds it on the target
# against the torch it finds there) and `requirements.txt`: the exact pins
# install.sh installs, without dependency resolution, so nothing is fetched.
#
# torch and torchvision are left out: the target has its own (matching its
# CUDA driver). apla_mm needs torch 2.1.2 ... 2.13.0 there.
#
# Options:
#   --python X.Y      the target's Python (default: python3 here, or $PYTHON);
#                     resolved with a Python X.Y of this machine if it has one
#   --stack VERSION   the torch stack whose pins apply (tools/constraints/
#                     torch-VERSION.txt; default 2.13.0; 2.1.2 pins numpy<2)
#   --exclude NAME    leave a distribution out because the target has it, e.g.
#                     `--exclude opencv-python` where opencv-python-headless
#                     is installed (repeatable)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMAND="tools/make_wheelhouse.sh $*"
PY="${PYTHON:-python3}"
DIR=""
PYVER=""
STACK="2.13.0"
EXCLUDE=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PYVER="$2"; shift 2 ;;
    --stack) STACK="$2"; shift 2 ;;
    --exclude) EXCLUDE+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "make_wheelhouse.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) [[ -z "$DIR" ]] || { echo "make_wheelhouse.sh: one folder only" >&2; exit 2; }
       DIR="$1"; shift ;;
  esac
done
[[ -n "$DIR" ]] || { echo "usage: make_wheelhouse.sh DIR [--python X.Y] [--stack V] [--exclude NAME]..." >&2; exit 2; }
CONSTRAINTS="$ROOT/tools/constraints/torch-$STACK.txt"
[[ -f "$CONSTRAINTS" ]] || { echo "make_wheelhouse.sh: no stack '$STACK' (tools/constraints/)" >&2; exit 2; }
pyver() { "$1" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || echo none; }
PYVER="${PYVER:-$(pyver "$PY")}"
# pip evaluates environment markers (`tomli; python_version < "3.11"`) for the
# Python that runs it, whatever --python-version says: resolve with the
# target's Python where this machine has one.
if [[ "$(pyver "$PY")" != "$PYVER" ]]; then
  for candidate in "python$PYVER" "$(pyenv root 2>/dev/null)/versions/$PYVER"*/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && [[ "$(pyver "$candidate")" == "$PYVER" ]]; then
      PY="$(command -v "$candidate")"; break
    fi
  done
  [[ "$(pyver "$PY")" == "$PYVER" ]] || echo "make_wheelhouse.sh: warning: no Python $PYVER here; requirements that apply only on $PYVER (environment markers) are resolved for $(pyver "$PY") and may be missing" >&2
fi
ABI="cp${PYVER/./}"
if [[ -e "$DIR" ]] && [[ -n "$(ls -A "$DIR")" ]]; then
  echo "make_wheelhouse.sh: $DIR exists and is not empty; choose a new folder" >&2; exit 2
fi
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
log() { printf '\033[1m[apla_mm wheelhouse]\033[0m %s\n' "$*"; }

# What apla_mm needs besides torch, torchvision and mmcv (kept equal to
# setup.py's install_requires by tests/test_install.py), the runtime needs of
# mmcv 2.1.0 (its setup.py), timm's non-torch needs, mmcv's build tools and
# the test runner for the smoke test.
REQUIREMENTS=(
  mmengine mmsegmentation mmdet 'setuptools<81' ftfy regex safetensors numpy
  opencv-python pycocotools matplotlib tqdm
  addict packaging Pillow pyyaml yapf
  huggingface_hub
  wheel ninja
  'pytest>=7' pytest-timeout 'pytest-xdist>=3'
)
TIMM=$(sed -n 's/^timm==//p' "$CONSTRAINTS")
PLATFORMS=(--platform manylinux2014_x86_64)
for glibc in 17 24 27 28 31 34 35 38 39; do PLATFORMS+=(--platform "manylinux_2_${glibc}_x86_64"); done
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp --abi "$ABI" "${PLATFORMS[@]}")
PIP=("$PY" -m pip --isolated --disable-pip-version-check)

log "resolving for Python $PYVER ($ABI, manylinux x86_64) with $PY, stack torch $STACK"
REPORT="$DIR/.resolve.json"
"${PIP[@]}" install --quiet --dry-run --ignore-installed --report "$REPORT" \
  --target "$DIR/.resolve-target" "${TARGET[@]}" -c "$CONSTRAINTS" "${REQUIREMENTS[@]}"
rm -rf "$DIR/.resolve-target"
"$PY" - "$REPORT" "$DIR/requirements.txt" "$TIMM" "${EXCLUDE[@]}" <<'PY'
import json, sys
report, out, timm, *exclude = sys.argv[1:]
norm = lambda n: n.lower().replace('_', '-')
excluded = {norm(n) for n in exclude} | {'torch', 'torchvision'}
pins = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}"
              for i in json.load(open(report))['install']
              if norm(i['metadata']['name']) not in excluded)
if 'timm' not in excluded:  # pinned by the stack, unless the target has it
    pins.append(f'timm=={timm}')
open(out, 'w').write('\n'.join(pins) + '\n')
PY
rm -f "$REPORT"

log "downloading $(wc -l < "$DIR/requirements.txt") wheels"
"${PIP[@]}" download --quiet --no-deps "${TARGET[@]}" -d "$DIR" -r "$DIR/requirements.txt"
log "downloading the mmcv 2.1.0 source archive"
# Straight from the index (its JSON simple API, PEP 691): `pip download`
# would run mmcv's setup.py to read its metadata, which needs torch here.
"$PY" - "$DIR" <<'PY'
import hashlib, json, os, sys, urllib.request
name = 'mmcv-2.1.0.tar.gz'
request = urllib.request.Request('https://pypi.org/simple/mmcv/', headers={
    'Accept': 'application/vnd.pypi.simple.v1+json'})
files = json.load(urllib.request.urlopen(request, timeout=60))['files']
entry = next(f for f in files if f['filename'] == name)
data = urllib.request.urlopen(entry['url'], timeout=300).read()
if hashlib.sha256(data).hexdigest() != entry['hashes']['sha256']:
    sys.exit(f'{name}: sha256 differs from the index')
with open(os.path.join(sys.argv[1], name), 'wb') as f:
    f.write(data)
PY

cat > "$DIR/wheelhouse.json" <<EOF
{"python": "$PYVER", "abi": "$ABI", "platform": "manylinux x86_64", "stack": "torch $STACK",
 "excluded": "torch torchvision ${EXCLUDE[*]}", "made": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
 "command": "$COMMAND"}
EOF
log "done: $DIR ($(du -sh "$DIR" | cut -f1)); on the target: bash tools/install.sh --wheelhouse DIR"
