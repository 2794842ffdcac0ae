#!/usr/bin/env bash
# messagescheduler.sh: start, watch, test and stop the Kafka message scheduler, its experiment and
# the MySQL baseline, with Docker Compose or (without a Docker engine) on the local stack.
#
# Without Docker the system runs on local servers that speak the real protocols (see README):
#   Kafka protocol  nisshi broker (SQLite storage)   127.0.0.1:${SM_KAFKA_PORT:-9092}
#   MongoDB         SecantusDB                       127.0.0.1:${SM_MONGO_PORT:-27017}
#   MySQL           MariaDB from Debian              127.0.0.1:3306
# Data, logs and PID files live under .stack/ (git-ignored). Only processes this script started
# (recorded by PID) are ever stopped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STACK="${SM_STACK_DIR:-$ROOT/.stack}"
KAFKA_PORT="${SM_KAFKA_PORT:-9092}"
MONGO_PORT="${SM_MONGO_PORT:-27017}"
MYSQL_PORT=3306
NISSHI_VERSION=0.8.1
SECANTUS_VERSION=0.7.0b3
CONFLUENT_KAFKA_VERSION=2.16.1

usage() {
  cat <<'EOF'
Usage: ./messagescheduler.sh [OPTION]...
Build and run the Kafka message scheduler, its SMS experiment and the MySQL baseline: with Docker
Compose where a Docker engine runs, otherwise as local processes on the local stack.

      --help              display this help and exit
      --all               run all services (with GUIs and Grafana where they exist), then the
                          live progress view
      --app               run the Kafka message scheduler alone
      --exp               run the experiment configured in compose/experiment.env [default]
      --gui               include the GUIs (Kafka UI, Mongo Express, Adminer; Docker only)
      --grafana           include Prometheus and Grafana (locally: Prometheus from Debian)
  -c,  --clean            remove this project's build cache and logs
  -dc, --deep-clean       also remove its data and containers
  -p,  --progress         show the experiment's progress once
  -pl, --progress-live    show the experiment's progress, refreshed in place (Ctrl-C to leave)
  -s,  --stop             stop everything this script started
      --stack             only install and start the local servers (broker, MongoDB, MySQL)
      --test              the local stack, then every test of the workspace
      --dry-run           print the Docker commands instead of running them
Environment: SM_DOCKER=1/0 forces or forbids the Docker branch; SM_MESSENGER_URL (default
http://127.0.0.1:5000) is what -p/-pl read.
EOF
}

log() { printf '\033[1m[messagescheduler]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- installing --------------------------------------------------------------------------------

apt_updated=0
apt_install() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    "${sudo[@]}" apt-get update -qq
    apt_updated=1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Build dependencies of the workspace: cmake for the bundled librdkafka; curl headers because
# librdkafka 2.12's CMake build includes <curl/curl.h> even without curl; OpenSSL for TLS.
ensure_build_deps() {
  apt_install cmake pkg-config libssl-dev libcurl4-openssl-dev python3-venv
}

# nisshi needs rustc >= 1.96: plain cargo when stable is new enough, else a nightly toolchain.
ensure_nisshi() {
  # (Output is captured, not piped into grep -q: with pipefail, grep's early exit fails the pipe.)
  if command -v nisshi >/dev/null && [ "$(nisshi --version 2>/dev/null)" = "nisshi $NISSHI_VERSION" ]; then
    return 0
  fi
  local toolchain=()
  local minor
  minor="$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')"
  if [ "$minor" -ge 96 ] 2>/dev/null; then
    toolchain=()
  elif [[ "$(rustup toolchain list 2>/dev/null)" == *nightly* ]]; then
    toolchain=(+nightly)
  else
    die "nisshi $NISSHI_VERSION needs rustc 1.96 or newer: install one (rustup toolchain install nightly) and retry"
  fi
  log "installing nisshi $NISSHI_VERSION: a Rust build of about 22 minutes on 2 cores, once per machine"
  cargo "${toolchain[@]}" install nisshi --version "$NISSHI_VERSION" --locked \
    --no-default-features --features dynostore,libsql
}

# The stack's Python: SecantusDB (the MongoDB server), and confluent-kafka, the ordinary external
# Kafka client the benchmark measures the scheduler with (messenger/benches/steady_client.py).
ensure_secantus() {
  local venv="$STACK/venv"
  if [ -x "$venv/bin/secantusd-py" ] &&
    [ "$("$venv/bin/pip" show SecantusDB 2>/dev/null | sed -n 's/^Version: //p')" = "$SECANTUS_VERSION" ] &&
    [ "$("$venv/bin/pip" show confluent-kafka 2>/dev/null | sed -n 's/^Version: //p')" = "$CONFLUENT_KAFKA_VERSION" ]; then
    return 0
  fi
  log "installing SecantusDB $SECANTUS_VERSION and confluent-kafka $CONFLUENT_KAFKA_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "SecantusDB==$SECANTUS_VERSION" "confluent-kafka==$CONFLUENT_KAFKA_VERSION"
}

# ---- starting and stopping ---------------------------------------------------------------------

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() {
  local file="$STACK/pids/$1.pid"
  [ -f "$file" ] && kill -0 "$(cat "$file")" 2>/dev/null
}

wait_port() {
  local name=$1 port=$2 pid=${3:-}
  local i
  for i in $(seq 1 300); do
    port_open "$port" && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$STACK/logs/$name.log" >&2 || true
      die "$name exited during start-up (log: $STACK/logs/$name.log)"
    fi
    sleep 0.1
    [ "$i" -eq 300 ] && die "$name did not answer on 127.0.0.1:$port within 30 s"
  done
}

# start NAME PORT DIR COMMAND...: runs COMMAND in DIR in the background, records its PID, waits.
start() {
  local name=$1 port=$2 dir=$3
  shift 3
  if pid_alive "$name" && port_open "$port"; then
    log "$name already running (pid $(cat "$STACK/pids/$name.pid")) on 127.0.0.1:$port"
    return 0
  fi
  if port_open "$port"; then
    log "$name: something else already answers on 127.0.0.1:$port; using it"
    return 0
  fi
  mkdir -p "$dir" "$STACK/logs" "$STACK/pids"
  (cd "$dir" && exec "$@" >>"$STACK/logs/$name.log" 2>&1) &
  local pid=$!
  echo "$pid" >"$STACK/pids/$name.pid"
  wait_port "$name" "$port" "$pid"
  log "$name started (pid $pid) on 127.0.0.1:$port"
}

start_kafka() {
  ensure_nisshi
  local dir="$STACK/kafka"
  mkdir -p "$dir"
  # nisshi reads a .env file in its working directory and STORAGE_ENGINE: keep both out of play.
  # It also logs through RUST_LOG, and a filter meant for our services slows it many times over.
  rm -f "$dir/.env"
  start kafka "$KAFKA_PORT" "$dir" env -u STORAGE_ENGINE -u SCHEMA_REGISTRY -u LISTENER_URL \
    -u ADVERTISED_LISTENER_URL -u CLUSTER_ID RUST_LOG=warn nisshi broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine sqlite://broker.db \
    --group-initial-rebalance-delay 0s --silent
}

start_mongo() {
  ensure_secantus
  start mongo "$MONGO_PORT" "$STACK/mongo" "$STACK/venv/bin/secantusd-py" \
    --host 127.0.0.1 --port "$MONGO_PORT" --storage-path "$STACK/mongo"
}

start_mysql() {
  if port_open "$MYSQL_PORT"; then
    log "mysql answers on 127.0.0.1:$MYSQL_PORT"
    return 0
  fi
  apt_install mariadb-server
  mkdir -p "$STACK/pids"
  log "starting MariaDB"
  start-stop-daemon --start --oknodo --background --make-pidfile \
    --pidfile "$STACK/pids/mysql.pid" --exec /usr/sbin/mariadbd
  wait_port mysql "$MYSQL_PORT"
}

stack() {
  mkdir -p "$STACK"
  ensure_build_deps
  start_kafka
  start_mongo
  start_mysql
}

stop_all() {
  local file name pid i
  for file in "$STACK"/pids/*.pid; do
    [ -e "$file" ] || continue
    name="$(basename "$file" .pid)"
    pid="$(cat "$file")"
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping $name (pid $pid)"
      kill "$pid" 2>/dev/null || true
      for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid" 2>/dev/null || true
      fi
    fi
    rm -f "$file"
  done
}

export_env() {
  export SM_BOOTSTRAP_SERVERS="127.0.0.1:$KAFKA_PORT"
  export SM_MONGODB_URI="mongodb://127.0.0.1:$MONGO_PORT"
  export SM_MYSQL_URL="mysql://root@127.0.0.1:$MYSQL_PORT/test"
}

# The live page's browser test: Debian's Chromium, driven by playwright-core from npm.
ensure_web_test() {
  apt_install chromium
  command -v npm >/dev/null || apt_install nodejs npm
  if [ ! -d "$ROOT/messenger/web-test/node_modules/playwright-core" ]; then
    log "installing playwright-core for the live page test"
    (cd "$ROOT/messenger/web-test" && npm ci --silent --no-audit --no-fund)
  fi
}

run_tests() {
  stack
  ensure_web_test
  export_env
  log "running the workspace's tests"
  cargo test --workspace --all-targets
}

# ---- the services: Docker Compose, or local processes ------------------------------------------

COMPOSE_DIR="$ROOT/compose"
MESSENGER_URL="${SM_MESSENGER_URL:-http://127.0.0.1:5000}"
DRY_RUN=0
WITH_GUI=0
WITH_GRAFANA=0

use_docker() {
  case "${SM_DOCKER:-auto}" in
    1|yes|true) return 0 ;;
    0|no|false) return 1 ;;
  esac
  command -v docker >/dev/null && docker info >/dev/null 2>&1
}

# Runs a command, or prints it with --dry-run.
run() {
  if [ "$DRY_RUN" -eq 1 ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# compose [--app] ARGS...: docker compose over the module files (--app: Kafka and the scheduler).
compose() {
  local files=(-f "$COMPOSE_DIR/kafka.yml" -f "$COMPOSE_DIR/scheduler.yml")
  if [ "${1:-}" = "--app" ]; then
    shift
  else
    files+=(-f "$COMPOSE_DIR/db-scheduler.yml" -f "$COMPOSE_DIR/messenger.yml")
  fi
  [ "$WITH_GRAFANA" -eq 1 ] && files+=(-f "$COMPOSE_DIR/monitoring.yml")
  local profiles=()
  [ "$WITH_GUI" -eq 1 ] && profiles+=(--profile gui)
  run docker compose --project-directory "$COMPOSE_DIR" "${files[@]}" "${profiles[@]}" "$@"
}

build_release() {
  log "building the release binaries"
  cargo build --release --bins --quiet
}

# Exports compose/experiment.env's settings, except those already set in the environment, so
# `SM_EXP_COUNT=200 ./messagescheduler.sh --exp` overrides the file.
load_experiment_env() {
  local key value
  while IFS='=' read -r key value; do
    [[ "$key" =~ ^[A-Z][A-Z0-9_]*$ ]] || continue
    [ -n "${!key+set}" ] || export "$key=$value"
  done <"$COMPOSE_DIR/experiment.env"
}

local_services() {
  local what=$1
  stack
  export_env
  build_release
  load_experiment_env
  start scheduler 8000 "$STACK/run" "$ROOT/target/release/scheduler"
  [ "$what" = app ] && return 0
  start db-scheduler 8001 "$STACK/run" "$ROOT/target/release/db-scheduler"
  start messenger 5000 "$STACK/run" "$ROOT/target/release/messenger" serve
  if [ "$WITH_GRAFANA" -eq 1 ]; then
    start_prometheus
    log "Grafana is not installable here: its dashboards are in compose/grafana (with Docker: --grafana)"
  fi
  if [ "$WITH_GUI" -eq 1 ]; then
    log "Kafka UI, Mongo Express and Adminer need Docker; the messenger's live page is at $MESSENGER_URL/"
  fi
}

start_prometheus() {
  apt_install prometheus
  local dir="$STACK/prometheus"
  mkdir -p "$dir/data"
  sed -e 's/"scheduler:8000"/"127.0.0.1:8000"/' -e 's/"db-scheduler:8001"/"127.0.0.1:8001"/' \
    -e 's/"messenger:5000"/"127.0.0.1:5000"/' "$COMPOSE_DIR/prometheus/prometheus.yml" >"$dir/prometheus.yml"
  start prometheus 9090 "$dir" /usr/bin/prometheus --config.file="$dir/prometheus.yml" \
    --storage.tsdb.path="$dir/data" --web.listen-address=127.0.0.1:9090
}

up() {
  local what=$1
  if use_docker; then
    if [ "$what" = app ]; then
      compose --app up -d --build --wait
    else
      compose up -d --build --wait
    fi
  elif [ "$DRY_RUN" -eq 1 ]; then
    log "no Docker engine: would start the local stack and the $what services as local processes"
  else
    local_services "$what"
  fi
}

start_experiment() {
  log "starting the experiment of compose/experiment.env"
  run curl -fsS -X POST -H 'content-type: application/json' -d '{}' "$MESSENGER_URL/produce-messages"
  echo
}

# One frame of the progress view, from the messenger's /monitor.
progress_frame() {
  curl -fsS "$MESSENGER_URL/monitor" | python3 -c '
import json, sys
m = json.load(sys.stdin)
t = m["total"]
print("run", m.get("run_id") or "-")
print("sent {sent}  delivered {delivered}  pending {pending}  SMS failed {failed}".format(**t))
row = "{:<6} {:>8} {:>9} {:>8} {:>5} {:>8} {:>8} {:>8} {:>8}"
print(row.format("path", "sent", "received", "pending", "dup", "p50 ms", "p95 ms", "p99 ms", "max ms"))
f = lambda v: "-" if v is None else v
for name, p in sorted(m["paths"].items()):
    print(row.format(name, p["sent"], p["received"], p["pending"], p["duplicates"],
                     f(p["p50_ms"]), f(p["p95_ms"]), f(p["p99_ms"]), f(p["max_ms"])))
'
}

progress() {
  progress_frame || die "the messenger does not answer at $MESSENGER_URL"
}

# Refreshes in place every second; SM_PROGRESS_FRAMES bounds the frames (for tests).
progress_live() {
  local frames=${SM_PROGRESS_FRAMES:-0} n=0 out
  while :; do
    out="$(progress_frame 2>/dev/null || echo "waiting for the messenger at $MESSENGER_URL ...")"
    printf '\033[H\033[J%s\n(refreshed every second; Ctrl-C to leave)\n' "$out"
    n=$((n + 1))
    if [ "$frames" -gt 0 ] && [ "$n" -ge "$frames" ]; then
      break
    fi
    sleep 1
  done
}

stop() {
  if use_docker; then
    WITH_GRAFANA=1 WITH_GUI=1 compose down --remove-orphans
  fi
  [ "$DRY_RUN" -eq 1 ] || stop_all
}

clean() {
  local deep=$1
  stop
  if use_docker && [ "$deep" -eq 1 ]; then
    WITH_GRAFANA=1 WITH_GUI=1 compose down --volumes --rmi local --remove-orphans
  fi
  run rm -rf "$STACK/logs" "$ROOT/target"
  if [ "$deep" -eq 1 ]; then
    run rm -rf "$STACK"
  fi
}

main() {
  local action=exp progress_after=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --help|-h) usage; exit 0 ;;
      --all) action=all; WITH_GUI=1; WITH_GRAFANA=1; progress_after=1 ;;
      --app) action=app ;;
      --exp) action=exp ;;
      --gui) WITH_GUI=1 ;;
      --grafana) WITH_GRAFANA=1 ;;
      -c|--clean) action=clean ;;
      -dc|--deep-clean) action="deep-clean" ;;
      -p|--progress) action=progress ;;
      -pl|--progress-live) action=progress-live ;;
      -s|--stop) action=stop ;;
      --stack) action=stack ;;
      --test) action="test" ;;
      --dry-run) DRY_RUN=1 ;;
      *) usage; die "unknown option: $1" ;;
    esac
    shift
  done
  case "$action" in
    stack) stack ;;
    test) run_tests ;;
    app)
      up app
      log "the scheduler answers at http://127.0.0.1:8000/api/jq"
      ;;
    exp|all)
      up exp
      start_experiment
      if [ "$progress_after" -eq 1 ] && [ "$DRY_RUN" -eq 0 ]; then
        progress_live
      else
        log "watch it: ./messagescheduler.sh -pl, or $MESSENGER_URL/ in a browser"
      fi
      ;;
    progress) progress ;;
    progress-live) progress_live ;;
    stop) stop ;;
    clean) clean 0 ;;
    deep-clean) clean 1 ;;
  esac
}

main "$@"
