#!/usr/bin/env bash
# The GPU checks, prepared to run as one short script on a machine with a CUDA GPU:
#
#   bash scripts/gpu_check.sh                       # with the python on PATH (the project installed)
#   PYTHON=/path/to/python bash scripts/gpu_check.sh
#   VLLM_PYTHON=/path/to/venv/bin/python bash ...   # a separate environment that has the CUDA `vllm`
#
# 1. the embedded stack on CUDA with the transformers backend (tests/e2e/test_cuda_run.py: GRPO,
#    PPO, TRPO in fp32 and GRPO in bf16);
# 2. the vLLM tests (tests/vllm, on the GPU: vLLM picks its device from its build) and the older
#    GPU vLLM test in tests/integration/test_generator.py, where `vllm` is importable; where it is not
#    (the lent GPU machines have no vLLM and reach no registry), the script says so and skips them;
# 3. the GPU compose profile, statically (`docker compose ... --profile gpu config`), where a Compose
#    binary exists.
# Exits non-zero if anything that ran failed; prints what ran and what was skipped at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/protos${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
VPY=${VLLM_PYTHON:-$PY}
RAN=() SKIPPED=() FAILED=()

step() {  # step NAME COMMAND...: run, record the outcome
  local name=$1; shift
  echo "== $name"
  local t0; t0=$(date +%s)
  if "$@"; then RAN+=("$name ($(( $(date +%s) - t0 )) s)"); else FAILED+=("$name"); fi
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to $PY (torch.cuda.is_available() is False): nothing to check here" >&2
  exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

step "e2e on CUDA (transformers backend)" \
  "$PY" -m pytest -q -p no:cacheprovider tests/e2e/test_cuda_run.py

if "$VPY" -c "import vllm; from vllm.platforms import current_platform as p; import sys; \
print('vllm', vllm.__version__, 'on', p.device_type); sys.exit(0 if p.device_type == 'cuda' else 1)"; then
  step "vLLM tests on the GPU (tests/vllm)" \
    "$VPY" -m pytest -q -p no:cacheprovider -m vllm tests/vllm
  step "vLLM integration test (bf16, tests/integration/test_generator.py::test_vllm_backend)" \
    "$VPY" -m pytest -q -p no:cacheprovider "tests/integration/test_generator.py::test_vllm_backend"
else
  SKIPPED+=("vLLM tests: no CUDA build of vllm importable by $VPY (set VLLM_PYTHON to an environment with it)")
fi

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
else COMPOSE=(); fi
if [ ${#COMPOSE[@]} -gt 0 ]; then
  step "GPU compose profile (static config check)" \
    "${COMPOSE[@]}" -f docker/compose.yaml --profile gpu config --quiet
else
  SKIPPED+=("GPU compose profile: no Compose binary")
fi

echo
for r in "${RAN[@]}"; do echo "ran:     $r"; done
for s in "${SKIPPED[@]}"; do echo "skipped: $s"; done
for f in "${FAILED[@]}"; do echo "FAILED:  $f"; done
[ ${#FAILED[@]} -eq 0 ]
