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
  -c,  --clean            stop, then remove what this project built and ran: its release
                          binaries and the local stack's data and logs
  -dc, --deep-clean       stop, then remove everything: all of target/, .stack/ (with the
                          Python venv), and with Docker the containers, volumes and images
  -p,  --progress         show the experiment's progress once
  -pl, --progress-live    show the experiment's progress, refreshed in place (Ctrl-C to leave)
  -s,  --stop             stop everything this script started
      --stack             only install and start the local servers (broker, MongoDB, MySQL)
      --test              MongoDB, MySQL and a fresh broker of its own, then every test
      --dry-run           print the Docker commands instead of running them
One action per run: two of --all/--app/--exp/-c/-dc/-p/-pl/-s/--stack/--test are refused.
Environment: SM_DOCKER=1/0 forces or forbids the Docker branch; SM_MESSENGER_URL (default
http://127.0.0.1:5000) is what -p/-pl read; SM_BIN_DIR runs the binaries there instead of
building release ones; SM_SCHEDULER_PORT (default 8000) is the local scheduler's HTTP port; SM_SHUTDOWN_TIMEOUT (default 20s) is the
scheduler's clean-stop limit, and -s waits that plus 10 s before SIGKILL.
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
  apt_install cmake pkg-config libssl-dev libcurl4-openssl-dev python3-venv jq
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

# The command line of a process, as one line ('' when it is gone).
cmdline_of() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }

# pid_ours NAME: its PID file names a live process that still runs the command we started (a PID
# the system reused for something else is not ours).
pid_ours() {
  local name=$1
  pid_alive "$name" || return 1
  [ "$(cmdline_of "$(cat "$STACK/pids/$name.pid")")" = "$(cat "$STACK/pids/$name.cmd" 2>/dev/null)" ]
}

# The PID listening on a port, or nothing.
port_pid() {
  ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2
}

# Who listens on a port: "pid N (command)", or "an unknown process". The command is shortened
# for messages only: decisions read the whole command line (port_free_for).
port_holder() {
  local pid
  pid="$(port_pid "$1")"
  if [ -n "$pid" ]; then
    echo "pid $pid ($(cmdline_of "$pid" | cut -c1-80))"
  else
    echo "an unknown process"
  fi
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

# start NAME PORT DIR COMMAND...: runs COMMAND in DIR in the background, in a session of its own
# (so a Ctrl-C in this terminal does not reach it), records its PID and command line, waits for
# the port. A process of ours already running is kept, unless SM_RESTART names it (a rebuilt
# binary). A port held by a process this script did not start is reported and left alone: for
# the stack's servers, another checkout's server of the same program is used (named); anything
# else stops the start.
start() {
  local name=$1 port=$2 dir=$3
  shift 3
  if pid_ours "$name"; then
    local pid
    pid="$(cat "$STACK/pids/$name.pid")"
    if [[ " ${SM_RESTART:-} " == *" $name "* ]]; then
      log "restarting $name (pid $pid): its binary was rebuilt"
      stop_one "$name"
    elif port_open "$port"; then
      log "$name already running (pid $pid) on 127.0.0.1:$port"
      return 0
    fi
  elif pid_alive "$name"; then
    log "$name: pid $(cat "$STACK/pids/$name.pid") is no longer the process we started; leaving it alone"
    rm -f "$STACK/pids/$name.pid" "$STACK/pids/$name.cmd"
  fi
  port_free_for "$name" "$port" || return 0
  mkdir -p "$dir" "$STACK/logs" "$STACK/pids"
  (cd "$dir" && exec setsid "$@" >>"$STACK/logs/$name.log" 2>&1 </dev/null) &
  local pid=$!
  echo "$pid" >"$STACK/pids/$name.pid"
  wait_port "$name" "$port" "$pid"
  cmdline_of "$pid" >"$STACK/pids/$name.cmd"
  # When its binary was built, so that a rebuild is noticed (restart_rebuilt).
  [ -f "$1" ] && stat -c %Y "$1" >"$STACK/pids/$name.built"
  log "$name started (pid $pid) on 127.0.0.1:$port"
}

# The programs of the stack's servers: a server of the same program on the port, started by
# another checkout of this project (or by hand), is used rather than refused.
declare -A STACK_PROGRAM=([kafka]=nisshi [mongo]=secantusd-py)

# port_free_for NAME PORT: true when the port is free for NAME to start on; false (after saying
# so) when a server of NAME's program already answers there, to be used; stops the script when
# anything else holds it, touching nothing.
port_free_for() {
  local name=$1 port=$2 holder program
  port_open "$port" || return 0
  if pid_ours "$name"; then
    return 1
  fi
  holder="$(port_holder "$port")"
  program="${STACK_PROGRAM[$name]:-}"
  # The whole command line: a long checkout path would push the program's name past the
  # shortened form in $holder.
  if [ -n "$program" ] && [[ "$(cmdline_of "$(port_pid "$port")")" == *"$program"* ]]; then
    log "$name: 127.0.0.1:$port is held by $holder, not started by this checkout; using it"
    return 1
  fi
  die "$name: 127.0.0.1:$port is held by $holder, which this script did not start; stop it or free the port (it was not touched)"
}

# nisshi_command PORT: sets NISSHI to the broker's command line for 127.0.0.1:PORT, with SQLite
# storage in the working directory. nisshi reads a .env file in its working directory and
# STORAGE_ENGINE: keep both out of play. It also logs through RUST_LOG, and a filter meant for our
# services slows it many times over.
nisshi_command() {
  NISSHI=(env -u STORAGE_ENGINE -u SCHEMA_REGISTRY -u LISTENER_URL
    -u ADVERTISED_LISTENER_URL -u CLUSTER_ID RUST_LOG=warn nisshi broker
    --listener-url "tcp://127.0.0.1:$1"
    --advertised-listener-url "tcp://127.0.0.1:$1"
    --storage-engine sqlite://broker.db
    --group-initial-rebalance-delay 0s --silent)
}

start_kafka() {
  pid_ours kafka || port_free_for kafka "$KAFKA_PORT" || return 0
  ensure_nisshi
  local dir="$STACK/kafka"
  mkdir -p "$dir"
  rm -f "$dir/.env"
  nisshi_command "$KAFKA_PORT"
  start kafka "$KAFKA_PORT" "$dir" "${NISSHI[@]}"
}

# A broker of the test run's own, on a free port with an empty data directory, stopped (by PID)
# and removed when the run ends, even when it fails: no topic, group or backlog of the main job
# or of an earlier run is in play (a long-lived broker with hundreds of MiB of earlier topics once
# made the cancel and experiment tests late), and the stack's broker is left alone. Started and
# stopped like every other process of the script (`start`, `stop_one`).
start_test_broker() {
  ensure_nisshi
  local port
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  TEST_KAFKA_DIR="$(mktemp -d "$STACK/test-kafka.XXXXXX")"
  trap stop_test_broker EXIT
  trap "exit 130" INT TERM
  nisshi_command "$port"
  start test-kafka "$port" "$TEST_KAFKA_DIR" "${NISSHI[@]}"
  KAFKA_PORT=$port
}

stop_test_broker() {
  [ -f "$STACK/pids/test-kafka.pid" ] && stop_one test-kafka
  rm -rf "${TEST_KAFKA_DIR:?}"
}

start_mongo() {
  pid_ours mongo || port_free_for mongo "$MONGO_PORT" || return 0
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
  wait_port mysql "$MYSQL_PORT" "$(cat "$STACK/pids/mysql.pid")"
  cmdline_of "$(cat "$STACK/pids/mysql.pid")" >"$STACK/pids/mysql.cmd"
}

stack() {
  mkdir -p "$STACK"
  ensure_build_deps
  start_kafka
  start_mongo
  start_mysql
  # The venv also holds the benchmark's ordinary client (confluent-kafka): install it even when
  # another checkout's MongoDB server is used.
  ensure_secantus
}

# A clean stop of the scheduler takes up to its SM_SHUTDOWN_TIMEOUT (20 s by default); the other
# services stop in moments. SIGKILL only after that and 10 s more.
SHUTDOWN_TIMEOUT_S="${SM_SHUTDOWN_TIMEOUT:-20s}"
SHUTDOWN_TIMEOUT_S="${SHUTDOWN_TIMEOUT_S%s}"
STOP_GRACE_S=$((SHUTDOWN_TIMEOUT_S + 10))

# stop_one NAME: SIGTERM to the process we started, SIGKILL after the grace period.
stop_one() {
  local name=$1 pid i
  pid="$(cat "$STACK/pids/$name.pid")"
  if pid_ours "$name" || { [ ! -f "$STACK/pids/$name.cmd" ] && pid_alive "$name"; }; then
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 $((STOP_GRACE_S * 10))); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not stop within ${STOP_GRACE_S} s; killing it"
      kill -9 "$pid" 2>/dev/null || true
    fi
  elif pid_alive "$name"; then
    log "$name: pid $pid is no longer the process we started; leaving it alone"
  fi
  rm -f "$STACK/pids/$name.pid" "$STACK/pids/$name.cmd" "$STACK/pids/$name.built"
}

# The services first, while the servers they talk to still answer: a scheduler stopping cleanly
# publishes what its timer holds and commits, which it cannot do once the broker is gone (stopped
# in the order of their names, the broker went first and the messenger waited out its whole grace
# period). Then the servers.
SERVERS=(kafka mongo mysql)

stop_all() {
  local file name
  for file in "$STACK"/pids/*.pid; do
    [ -e "$file" ] || continue
    name="$(basename "$file" .pid)"
    [[ " ${SERVERS[*]} " == *" $name "* ]] || stop_one "$name"
  done
  for name in "${SERVERS[@]}"; do
    [ -e "$STACK/pids/$name.pid" ] && stop_one "$name"
  done
  return 0
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
  mkdir -p "$STACK"
  ensure_build_deps
  start_test_broker
  start_mongo
  start_mysql
  ensure_secantus
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

# The binaries the local services run: the release build, or SM_BIN_DIR's (then nothing is built).
BIN_DIR="${SM_BIN_DIR:-$ROOT/target/release}"
SCHEDULER_PORT="${SM_SCHEDULER_PORT:-8000}"

build_release() {
  if [ -n "${SM_BIN_DIR:-}" ]; then
    log "running the binaries in $BIN_DIR (SM_BIN_DIR): nothing to build"
    return 0
  fi
  log "building the release binaries"
  cargo build --release --bins --quiet
}

# Our services whose binary was rebuilt since they started: `start` restarts them (SM_RESTART).
restart_rebuilt() {
  local name
  SM_RESTART=""
  for name in scheduler db-scheduler messenger; do
    pid_ours "$name" || continue
    if [ "$(stat -c %Y "$BIN_DIR/$name" 2>/dev/null)" != \
      "$(cat "$STACK/pids/$name.built" 2>/dev/null)" ]; then
      SM_RESTART+=" $name"
    fi
  done
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
  restart_rebuilt
  load_experiment_env
  SM_HTTP_ADDR="127.0.0.1:$SCHEDULER_PORT" SM_STATE_DIR="${SM_STATE_DIR:-$STACK/scheduler-state}" start scheduler "$SCHEDULER_PORT" "$STACK/run" "$BIN_DIR/scheduler"
  [ "$what" = app ] && return 0
  start db-scheduler 8001 "$STACK/run" "$BIN_DIR/db-scheduler"
  SM_SCHEDULER_URL="http://127.0.0.1:$SCHEDULER_PORT" start messenger 5000 "$STACK/run" "$BIN_DIR/messenger" serve
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

# The fields of the messenger's experiment (`POST /produce-messages` merges a body of them over the
# experiment it started with); its other SM_EXP_* settings (the senders) apply when it starts.
EXPERIMENT_FIELDS='["count","duration","rate","value_size","min_delay","max_delay","kafka","mysql","cancel_share","reschedule_share","grace"]'

# The experiment to run as a JSON body: compose/experiment.env's SM_EXP_* settings with the
# caller's over them. Sent whole, so a second --exp runs what this call says, although the
# messenger already running read its environment when it started.
experiment_body() {
  load_experiment_env
  jq -nc --argjson fields "$EXPERIMENT_FIELDS" '
    [env | to_entries[] | select(.key | startswith("SM_EXP_"))
      | .key |= (ltrimstr("SM_EXP_") | ascii_downcase)
      | select(.key as $k | $fields | index($k))
      | .value = (.value | if . == "true" then true elif . == "false" then false else (tonumber? // .) end)]
    | from_entries'
}

start_experiment() {
  apt_install jq
  local body
  body="$(experiment_body)"
  log "starting the experiment of compose/experiment.env and SM_EXP_*: $body"
  run curl -fsS -X POST -H 'content-type: application/json' -d "$body" "$MESSENGER_URL/produce-messages"
  echo
}

# One frame of the progress view, from the messenger's /monitor.
progress_frame() {
  local m
  m="$(curl -fs --max-time 5 "$MESSENGER_URL/monitor")" || return 1
  jq -r '"run \(.run_id // "-")",
    (.total | "sent \(.sent)  delivered \(.delivered)  pending \(.pending)  SMS failed \(.failed)  attempts \(.attempts // 0) (re-processed \(.reprocessed // 0))")' <<<"$m"
  {
    printf 'path\tsent\treceived\tpending\tmissing\tdup\tearly\tp50 ms\tp99 ms\tp99.9 ms\tmax ms\tcancelled\tcanc. arr.\tmoved\n'
    jq -r '.paths | to_entries | sort_by(.key)[] | .value as $p
      | [.key, $p.sent, $p.received, $p.pending, $p.missing, $p.duplicates, ($p.early // 0),
         $p.p50_ms, $p.p99_ms, $p.p999_ms, $p.max_ms,
         ($p.cancelled // 0), ($p.cancelled_arrived // 0), ($p.rescheduled // 0)]
      | map(if . == null then "-" else tostring end) | @tsv' <<<"$m"
  } | awk -F'\t' '{ printf "%-6s %8s %9s %8s %8s %5s %6s %8s %8s %9s %8s %9s %10s %6s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 }'
}

progress() {
  apt_install jq
  progress_frame || die "the messenger does not answer at $MESSENGER_URL (start it with ./messagescheduler.sh --exp)"
}

# Refreshes in place every second; SM_PROGRESS_FRAMES bounds the frames (for tests).
progress_live() {
  local frames=${SM_PROGRESS_FRAMES:-0} n=0 out
  apt_install jq
  # The services run in sessions of their own: Ctrl-C ends this view only.
  trap 'echo; log "left the live view; the services keep running (stop them with ./messagescheduler.sh -s)"; exit 0' INT
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

# -c: what this project built and ran (its release binaries, the stack's data and logs), not the
# rest of target/ nor the installed servers. -dc: everything, said out loud.
clean() {
  local deep=$1
  stop
  if [ "$deep" -eq 1 ]; then
    log "deep clean: removing $ROOT/target (all build artefacts), $STACK (data, logs, the Python venv)"
    if use_docker; then
      log "and the compose project's containers, volumes and locally built images"
      WITH_GRAFANA=1 WITH_GUI=1 compose down --volumes --rmi local --remove-orphans
    fi
    run rm -rf "$ROOT/target" "$STACK"
  else
    run rm -f "$ROOT/target/release/scheduler" "$ROOT/target/release/db-scheduler" \
      "$ROOT/target/release/messenger"
    run rm -rf "$STACK/logs" "$STACK/kafka" "$STACK/mongo" "$STACK/run" "$STACK/prometheus"
  fi
}

main() {
  local action="" given="" progress_after=0
  # One action per run: a second one is refused, never silently preferred.
  act() {
    if [ -n "$action" ] && [ "$action" != "$1" ]; then
      die "options $given and $2 conflict: give one of them"
    fi
    action=$1 given=$2
  }
  while [ $# -gt 0 ]; do
    case "$1" in
      --help|-h) usage; exit 0 ;;
      --all) act all "$1"; WITH_GUI=1; WITH_GRAFANA=1; progress_after=1 ;;
      --app) act app "$1" ;;
      --exp) act exp "$1" ;;
      --gui) WITH_GUI=1 ;;
      --grafana) WITH_GRAFANA=1 ;;
      -c|--clean) act clean "$1" ;;
      -dc|--deep-clean) act deep-clean "$1" ;;
      -p|--progress) act progress "$1" ;;
      -pl|--progress-live) act progress-live "$1" ;;
      -s|--stop) act stop "$1" ;;
      --stack) act stack "$1" ;;
      --test) act test "$1" ;;
      --dry-run) DRY_RUN=1 ;;
      *) usage; die "unknown option: $1" ;;
    esac
    shift
  done
  action=${action:-exp}
  case "$action" in
    stack) stack ;;
    test) run_tests ;;
    app)
      up app
      log "the scheduler answers at http://127.0.0.1:$SCHEDULER_PORT/api/jq"
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
