#!/usr/bin/env bash
# `make compose-test`: the compose stack for real. Installs the Docker engine if absent,
# starts dockerd if none runs (and stops only that one, by PID), builds a Debian base image
# with debootstrap (no registry needed) and the hetserve image on it, runs
# compose/docker-compose.yml with the demo model mounted, prefill and decode scaled to 2,
# checks it with tests/compose_check.py, and tears the stack down.
#
# Knobs (environment): PY (a python with hetserve's test extras), MODEL, TORCH_WHEEL (a CPU
# torch wheel; default: the first torch-*+cpu wheel in PIP_FIND_LINKS or /opt/wheels),
# COMPOSE_TEST_REBUILD_BASE=1 (rebuild the base image), COMPOSE_TEST_REMOVE_IMAGES=1,
# COMPOSE_TEST_PROMETHEUS=0 (skip the observability profile's Prometheus, which runs here
# from Debian's prometheus package: no registry is needed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
MODEL=${MODEL:-models/tiny-llama}
WORK=$(mktemp -d /tmp/hetserve-compose-test.XXXXXX)
BASE_IMAGE=hetserve-base:bookworm
IMAGE=hetserve:compose-test
PROMETHEUS_IMAGE=hetserve-prometheus:bookworm
WITH_PROMETHEUS=${COMPOSE_TEST_PROMETHEUS:-1}
PROJECT=hetserve-ct$$
COMPOSE_FILE_PATH=compose/docker-compose.yml
DOCKERD_PID=""
COPIED_WHEEL=""
STARTED=$(date +%s)

log() { echo "[compose-test +$(($(date +%s) - STARTED))s] $*"; }

COMPOSE=()  # set after install: docker-compose 1.29 (Debian), or the v2 plugin

find_compose() {
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  else
    COMPOSE=(docker-compose)
  fi
  COMPOSE+=(-p "$PROJECT" -f "$COMPOSE_FILE_PATH")
  if [ "$WITH_PROMETHEUS" = 1 ]; then
    # The profile's Prometheus, from Debian's package instead of a registry image.
    cat >"$WORK/prometheus.override.yml" <<EOF
services:
  prometheus:
    image: $PROMETHEUS_IMAGE
    entrypoint: [/usr/bin/prometheus, --config.file=/etc/prometheus/prometheus.yml,
                 --storage.tsdb.path=/tmp/prometheus]
EOF
    COMPOSE+=(-f "$WORK/prometheus.override.yml")
  fi
}

cleanup() {
  local rc=$?
  set +e
  if [ -n "${STACK_UP:-}" ]; then
    if [ "$rc" -ne 0 ]; then
      log "failed; the last log lines of every container:"
      timeout 60 "${COMPOSE[@]}" logs --no-color --tail 60
    fi
    log "tearing the stack down"
    timeout 180 "${COMPOSE[@]}" down -v --remove-orphans --timeout 20
  fi
  if [ "${COMPOSE_TEST_REMOVE_IMAGES:-0}" = 1 ]; then
    timeout 120 docker image rm -f "$IMAGE" "$PROMETHEUS_IMAGE" "$BASE_IMAGE" >/dev/null
  fi
  [ -n "$COPIED_WHEEL" ] && rm -f "$COPIED_WHEEL"
  if [ -n "$DOCKERD_PID" ]; then
    log "stopping the dockerd this test started (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    kill -9 "$DOCKERD_PID" 2>/dev/null
  fi
  if [ "$rc" -ne 0 ] && [ -s "$WORK/check.log" ]; then
    # Again after the container logs and the teardown, so that the tail of CI's output says why.
    log "the check's last lines:"
    tail -25 "$WORK/check.log"
  fi
  rm -rf "$WORK"
  log "done (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

install_engine() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 \
    || missing+=(docker-compose)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    timeout 300 apt-get update -q
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q "${missing[@]}"
  fi
}

start_dockerd() {
  if timeout 20 docker info >/dev/null 2>&1; then
    log "using the running Docker engine"
    return
  fi
  log "starting dockerd"
  dockerd >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do
    timeout 10 docker info >/dev/null 2>&1 && return
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 1
  done
  tail -20 "$WORK/dockerd.log"
  echo "dockerd did not come up" >&2
  return 1
}

apt_mirror() {
  # The Debian mirror apt uses here (deb822 or one-line sources).
  local uri
  uri=$(grep -hoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '{print $2}' | grep -v security | head -1 || true)
  [ -z "$uri" ] && uri=$(grep -hoE '^deb +\S+' /etc/apt/sources.list 2>/dev/null \
    | awk '{print $2}' | head -1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

build_base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
    && [ "${COMPOSE_TEST_REBUILD_BASE:-0}" != 1 ]; then
    log "base image $BASE_IMAGE exists"
    return
  fi
  local rootfs=$WORK/rootfs mirror
  mirror=$(apt_mirror)
  log "debootstrap bookworm from $mirror"
  timeout 900 debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
    bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; return 1; }
  # This network re-signs HTTPS: the host's extra CAs go into the image, never into git.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | timeout 300 docker import - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  log "base image $BASE_IMAGE imported"
}

find_torch_wheel() {
  if [ -n "${TORCH_WHEEL:-}" ]; then echo "$TORCH_WHEEL"; return; fi
  local dir
  for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
    compgen -G "$dir/torch-*+cpu-*.whl" >/dev/null && { ls "$dir"/torch-*+cpu-*.whl | head -1; return; }
  done
  true
}

build_image() {
  local wheel
  wheel=$(find_torch_wheel)
  if [ -n "$wheel" ] && [ ! -e "compose/wheels/$(basename "$wheel")" ]; then
    cp "$wheel" compose/wheels/
    COPIED_WHEEL=compose/wheels/$(basename "$wheel")
  fi
  log "building $IMAGE on $BASE_IMAGE (torch: ${wheel:-from PyPI})"
  DOCKER_BUILDKIT=0 timeout 1800 docker build -q -f compose/Dockerfile \
    --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; return 1; }
  log "built $IMAGE"
}

build_prometheus_image() {
  [ "$WITH_PROMETHEUS" = 1 ] || return 0
  docker image inspect "$PROMETHEUS_IMAGE" >/dev/null 2>&1 && return 0
  log "building $PROMETHEUS_IMAGE (Debian's prometheus package)"
  printf '%s\n' "FROM $BASE_IMAGE" \
    "RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
--no-install-recommends prometheus && rm -rf /var/lib/apt/lists/*" "USER nobody" \
    | DOCKER_BUILDKIT=0 timeout 900 docker build -q -t "$PROMETHEUS_IMAGE" - >"$WORK/prom.log" 2>&1 \
    || { tail -20 "$WORK/prom.log"; return 1; }
}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run_stack_and_check() {
  [ -f "$MODEL/config.json" ] || "$PY" scripts/make_tiny_model.py "$MODEL"
  # The containers run as an unprivileged user: the mounted model must be world-readable.
  find "$MODEL" -type f ! -perm -o=r -print -exec chmod a+r {} + | sed 's/^/made readable: /'
  export IMAGE MODEL_DIR GATEWAY_PORT NATS_PORT PROMETHEUS_PORT
  MODEL_DIR=$(cd "$MODEL" && pwd)
  GATEWAY_PORT=$(free_port)
  NATS_PORT=$(free_port)
  PROMETHEUS_PORT=$(free_port)
  local services=(nats gateway scheduler converter prefill decode) check_args=()
  if [ "$WITH_PROMETHEUS" = 1 ]; then
    services+=(prometheus)  # named: its profile need not be active
    check_args=(--prometheus-url "http://127.0.0.1:$PROMETHEUS_PORT")
  fi
  log "compose up (project $PROJECT): prefill=2 decode=2, gateway on :$GATEWAY_PORT"
  STACK_UP=1
  timeout 300 "${COMPOSE[@]}" up -d --no-build --scale prefill=2 --scale decode=2 "${services[@]}"
  local admin_password
  admin_password=$(sed -n 's/^NATS_PASSWORD_ADMIN=//p' compose/.env)
  timeout 900 "$PY" -m tests.compose_check --project "$PROJECT" \
    --gateway-url "http://127.0.0.1:$GATEWAY_PORT/v1" \
    --nats-url "nats://admin:$admin_password@127.0.0.1:$NATS_PORT" \
    --model-dir "$MODEL_DIR" --prefills 2 --decodes 2 "${check_args[@]}" 2>&1 \
    | tee "$WORK/check.log"
}

install_engine
find_compose
start_dockerd
build_base_image
build_image
build_prometheus_image
run_stack_and_check
log "compose test passed"
