#!/usr/bin/env bash
# messagescheduler.sh: start, test and stop the Kafka message scheduler on the local stack.
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

usage() {
  cat <<'EOF'
Usage: ./messagescheduler.sh [OPTION]...
Build and run the Kafka message scheduler on the local stack.

      --help     display this help and exit
      --stack    install what is missing and start the local servers (Kafka-protocol broker,
                 MongoDB-compatible server, MariaDB); a second call finds them running
      --app      the stack, then the scheduler alone (release build, foreground; Ctrl-C stops it)
      --test     the stack, then every test of the workspace
  -s, --stop     stop the servers this script started (by PID); leaves their data
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
  log "installing nisshi $NISSHI_VERSION (about 12 minutes on 2 cores, once per machine)"
  cargo "${toolchain[@]}" install nisshi --version "$NISSHI_VERSION" --locked \
    --no-default-features --features dynostore,libsql
}

ensure_secantus() {
  local venv="$STACK/venv"
  if [ -x "$venv/bin/secantusd-py" ] &&
    [ "$("$venv/bin/pip" show SecantusDB 2>/dev/null | sed -n 's/^Version: //p')" = "$SECANTUS_VERSION" ]; then
    return 0
  fi
  log "installing SecantusDB $SECANTUS_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "SecantusDB==$SECANTUS_VERSION"
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
  rm -f "$dir/.env"
  start kafka "$KAFKA_PORT" "$dir" env -u STORAGE_ENGINE -u SCHEMA_REGISTRY -u LISTENER_URL \
    -u ADVERTISED_LISTENER_URL -u CLUSTER_ID nisshi broker \
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

run_tests() {
  stack
  export_env
  log "running the workspace's tests"
  cargo test --workspace --all-targets
}

run_app() {
  stack
  export_env
  log "building and starting the scheduler (Ctrl-C stops it)"
  cargo run --release -p scheduler --bin scheduler
}

main() {
  [ $# -gt 0 ] || { usage; exit 0; }
  case "$1" in
    --help|-h) usage ;;
    --stack) stack ;;
    --app) run_app ;;
    --test) run_tests ;;
    -s|--stop) stop_all ;;
    *) usage; die "unknown option: $1" ;;
  esac
}

main "$@"
