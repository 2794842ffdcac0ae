#!/usr/bin/env bash
# messagescheduler.sh: start, watch, test and stop the Kafka message scheduler, its experiment and
# the MySQL baseline, with Docker Compose or (without a Docker engine) on the local stack.
#
# Without Docker the system runs on local servers (see README):
#   Kafka    Apache Kafka from Maven Central, one JVM in KRaft mode  127.0.0.1:${SM_KAFKA_PORT:-9092}
#   MongoDB  SecantusDB (MongoDB wire protocol)                      127.0.0.1:${SM_MONGO_PORT:-27017}
#   MySQL    MariaDB from Debian, its own data directory and user    127.0.0.1:${SM_MYSQL_PORT:-3306}
# Data, logs and PID files live under .stack/ (git-ignored); the broker's classpath is collected
# once per machine (SM_KAFKA_HOME). Only processes this script started (recorded by PID) are ever
# stopped. A server given from outside (SM_BOOTSTRAP_SERVERS, SM_MONGODB_URI, SM_MYSQL_URL) is
# used as it is: nothing local is started for it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Absolute, so that nothing depends on the directory the script was called from.
STACK="$(realpath -m -- "${SM_STACK_DIR:-$ROOT/.stack}")"
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
      --stack             only install and start the local servers (Kafka, MongoDB, MySQL)
      --test              MongoDB, MySQL and a fresh Kafka broker of its own, then every test
      --dry-run           print what would change instead of changing it (the Docker commands,
                          what -s would stop, what -c/-dc would remove); --stack, --test, -p and
                          -pl refuse it
One action per run: two of --all/--app/--exp/-c/-dc/-p/-pl/-s/--stack/--test are refused. One run
that changes something per stack directory: a second one says which run holds it and exits.
Works from any directory: it builds and tests the checkout it is in.

Environment:
  SM_KAFKA_PORT, SM_KAFKA_CONTROLLER_PORT  the local broker's ports (9092, and the next one)
  SM_KAFKA_HEAP           the local broker's JVM heap (512m)
  SM_KAFKA_VERSION        run another Apache Kafka version from Maven Central (broker/pom.xml's)
  SM_KAFKA_HOME           where the broker's classpath is kept (~/.cache/messagescheduler/kafka-V)
  SM_MONGO_PORT, SM_MYSQL_PORT  the local MongoDB and MariaDB ports (27017, 3306)
  SM_MYSQL_DIR            MariaDB's data directory (.stack/mysql)
  SM_BOOTSTRAP_SERVERS, SM_MONGODB_URI, SM_MYSQL_URL
                          use these servers instead: nothing local is started for them
  SM_DOCKER=1/0           force or forbid the Docker branch
  SM_MESSENGER_URL        what -p/-pl read (http://127.0.0.1:5000)
  SM_BIN_DIR              run the binaries there instead of building release ones
  SM_SCHEDULER_PORT       the local scheduler's HTTP port (8000)
  SM_SHUTDOWN_TIMEOUT     the scheduler's clean-stop limit (20s; read as the scheduler reads it:
                          500ms, 1.5s, 20s, 1m, 1h, "1m 30s"); -s waits that plus 10 s before SIGKILL
  SM_STACK_DIR            where the stack's data, logs, PID files and lock live (.stack)
  SM_STATE_DIR            the local scheduler's index of ids (.stack/scheduler-state)
EOF
}

log() { printf '\033[1m[messagescheduler]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- settings (read from the environment, checked, never evaluated) ------------------------------

# setting NAME DEFAULT PATTERN WHAT: the environment variable NAME, or DEFAULT, when it matches the
# extended regular expression PATTERN; anything else stops the script, saying WHAT was expected.
setting() {
  local value="${!1:-$2}"
  [[ "$value" =~ $3 ]] || die "$1=$value is not $4"
  printf '%s\n' "$value"
}
PORT_RE='^([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$'

KAFKA_PORT="$(setting SM_KAFKA_PORT 9092 "$PORT_RE" 'a TCP port')"
# The broker's controller listener (KRaft) is the second port of a local broker.
KAFKA_CONTROLLER_PORT="$(setting SM_KAFKA_CONTROLLER_PORT $((KAFKA_PORT + 1)) "$PORT_RE" 'a TCP port')"
MONGO_PORT="$(setting SM_MONGO_PORT 27017 "$PORT_RE" 'a TCP port')"
MYSQL_PORT="$(setting SM_MYSQL_PORT 3306 "$PORT_RE" 'a TCP port')"
# The Kafka version is the broker/pom.xml's (equal to compose/kafka.yml's image); SM_KAFKA_VERSION
# runs another one from Maven Central.
KAFKA_VERSION="$(setting SM_KAFKA_VERSION \
  "$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/broker/pom.xml")" \
  '^[0-9]+\.[0-9]+\.[0-9]+$' 'a Kafka version such as 4.4.0')"
KAFKA_HEAP="$(setting SM_KAFKA_HEAP 512m '^[1-9][0-9]*[mMgG]$' 'a JVM heap size such as 512m or 1g')"
# The broker's runtime classpath, collected once per machine by Maven (ensure_kafka).
KAFKA_HOME="$(realpath -m -- "${SM_KAFKA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/messagescheduler/kafka-$KAFKA_VERSION}")"
MYSQL_DIR="$(realpath -m -- "${SM_MYSQL_DIR:-$STACK/mysql}")"
# Servers given from outside: used as they are, nothing local is started for them.
EXTERNAL_KAFKA="${SM_BOOTSTRAP_SERVERS:-}"
EXTERNAL_MONGO="${SM_MONGODB_URI:-}"
EXTERNAL_MYSQL="${SM_MYSQL_URL:-}"

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
  apt_install cmake pkg-config libssl-dev libcurl4-openssl-dev python3-venv jq iproute2
}

# Java 17 or newer runs the broker (Kafka 4 needs it); Maven collects its classpath. Each is
# installed from Debian only when absent.
ensure_java() {
  if ! command -v java >/dev/null; then
    command -v apt-get >/dev/null ||
      die "the Kafka broker needs Java 17 or newer: there is no java on PATH and no apt-get to install default-jre-headless; install Java 17+ and retry"
    apt_install default-jre-headless
    command -v java >/dev/null || die "no java on PATH after installing default-jre-headless"
  fi
  local major
  major="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
  [ "${major%%.*}" -ge 17 ] 2>/dev/null ||
    die "Apache Kafka $KAFKA_VERSION needs Java 17 or newer; $(command -v java) is Java ${major:-of an unknown version}"
}

ensure_maven() {
  command -v mvn >/dev/null && return 0
  command -v apt-get >/dev/null ||
    die "collecting the Kafka broker's classpath needs Maven: there is no mvn on PATH and no apt-get to install maven; install Maven and retry"
  apt_install maven
  command -v mvn >/dev/null || die "no mvn on PATH after installing maven"
}

# The broker's runtime classpath (Apache Kafka from Maven Central and a log4j2 backend, as
# broker/pom.xml pins them) in $KAFKA_HOME/libs: collected once per machine, then reused. It is
# collected into a new directory that replaces the old one only when complete, so an interrupted
# download is never taken for a classpath.
ensure_kafka() {
  ensure_java
  [ -f "$KAFKA_HOME/complete" ] && [ -f "$KAFKA_HOME/libs/kafka_2.13-$KAFKA_VERSION.jar" ] && return 0
  ensure_maven
  mkdir -p "$(dirname "$KAFKA_HOME")"
  local tmp out started artifact
  tmp="$(mktemp -d "$KAFKA_HOME.partial.XXXXXX")"
  log "collecting Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_HOME (once per machine)"
  started=$SECONDS
  if ! out="$(mvn -B -ntp -f "$ROOT/broker/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp/libs" 2>&1)"; then
    rm -rf "$tmp"
    printf '%s\n' "$out" | grep -E '^\[ERROR\]' | head -n 5 >&2 || true
    # The first coordinates Maven names (group:artifact:type:version), other than this project's
    # own pom, are the artifact it failed on.
    artifact="$(printf '%s\n' "$out" | grep -E '^\[ERROR\]' |
      grep -oE '[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+:(jar|pom|maven-plugin)(:[A-Za-z0-9_.-]+)?:[0-9][A-Za-z0-9_.-]*' |
      grep -v '^io.github.messagescheduler:' | head -n 1 || true)"
    local what="the classpath of Apache Kafka $KAFKA_VERSION"
    die "Maven could not download ${artifact:-$what} from Maven Central (is it reachable? see the errors above)"
  fi
  touch "$tmp/complete"
  rm -rf "$KAFKA_HOME"
  mv "$tmp" "$KAFKA_HOME"
  log "Apache Kafka $KAFKA_VERSION: $(find "$KAFKA_HOME/libs" -name '*.jar' | wc -l) jars, $(du -sh "$KAFKA_HOME/libs" | cut -f1) in $((SECONDS - started)) s"
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

# pid_ours NAME: its PID file names a live process that still runs the command line recorded
# before we started it (a PID the system reused for something else is not ours, nor is a PID
# without a recorded command line). A program that is a script (#!) runs with its interpreter's
# name before the recorded command line.
pid_ours() {
  local name=$1 expected actual
  pid_alive "$name" || return 1
  expected="$(cat "$STACK/pids/$name.cmd" 2>/dev/null)" && [ -n "$expected" ] || return 1
  actual="$(cmdline_of "$(cat "$STACK/pids/$name.pid")")"
  [ "$actual" = "$expected" ] || [[ "$actual" == *" $expected" && "${actual%% *}" != *" "* ]]
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

# wait_port NAME PORT [PID]: waits until PORT answers; stops the script, with the last lines of
# the process's output (and of SERVER_LOG, the log the program writes itself, when set), when PID
# exits first or nothing answers within 30 s.
wait_port() {
  local name=$1 port=$2 pid=${3:-}
  local i
  for i in $(seq 1 300); do
    port_open "$port" && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$STACK/pids/$name.pid" "$STACK/pids/$name.cmd"
      tail -n 20 "$STACK/logs/$name.log" ${SERVER_LOG:+"$SERVER_LOG"} >&2 2>/dev/null || true
      die "$name exited during start-up (log: ${SERVER_LOG:-$STACK/logs/$name.log})"
    fi
    sleep 0.1
    [ "$i" -eq 300 ] && die "$name did not answer on 127.0.0.1:$port within 30 s"
  done
}

# start NAME PORT DIR COMMAND...: runs COMMAND in DIR in the background, in a session of its own
# (so a Ctrl-C in this terminal does not reach it), with its output in the stack's log, and waits
# for the port. Its command line is recorded before it starts and its PID by start-stop-daemon
# before the program runs, so that a crash of this script at any moment leaves nothing running
# that `-s` does not find and recognise. A process of ours already running is kept, unless SM_RESTART names it (a rebuilt
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
  local exe pid
  exe="$(command -v -- "$1")" || die "$name: $1 is not installed"
  exe="$(realpath -s -- "$exe")"
  shift
  printf '%s ' "$exe" "$@" >"$STACK/pids/$name.cmd"
  rm -f "$STACK/pids/$name.pid"
  start-stop-daemon --start --quiet --background --make-pidfile --pidfile "$STACK/pids/$name.pid" \
    --chdir "$dir" --output "$STACK/logs/$name.log" --startas "$exe" -- "$@" ||
    die "$name: start-stop-daemon could not start $exe"
  pid="$(cat "$STACK/pids/$name.pid")"
  wait_port "$name" "$port" "$pid"
  # When its binary was built, so that a rebuild is noticed (restart_rebuilt).
  stat -c %Y "$exe" >"$STACK/pids/$name.built"
  log "$name started (pid $pid) on 127.0.0.1:$port"
}

# The programs of the stack's servers: a server of the same program on the port, started by
# another checkout of this project (or by hand), is used rather than refused. (Not MariaDB: the
# project's account there would have another checkout's password.)
declare -A STACK_PROGRAM=([kafka]=kafka.Kafka [mongo]=secantusd-py)

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

# ---- Apache Kafka ------------------------------------------------------------------------------

# kafka_java DIR: sets KAFKA_JAVA to the JVM's command line for a broker whose configuration and
# logs are in DIR: the stack's heap, G1 with short pauses, log4j2 writing DIR/logs/server.log.
kafka_java() {
  KAFKA_JAVA=(java "-Xms$KAFKA_HEAP" "-Xmx$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$ROOT/broker/log4j2.properties" "-Dkafka.logs.dir=$1/logs"
    -cp "$KAFKA_HOME/libs/*")
}

# kafka_setup DIR PORT CONTROLLER_PORT: writes DIR/server.properties from broker/server.properties
# and formats DIR/data once (KRaft: a new cluster id, this node the only controller). A data
# directory this script did not format, or formatted by a newer Kafka than this one, or whose
# cluster id is not the one it formatted, is refused with a message and left as it is.
kafka_setup() {
  local dir=$1 port=$2 cport=$3 meta="$1/data/meta.properties" record="$1/formatted-by"
  mkdir -p "$dir/logs"
  sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$cport|g" -e "s|@DATA_DIR@|$dir/data|g" \
    "$ROOT/broker/server.properties" >"$dir/server.properties"
  if [ -f "$meta" ]; then
    local version cluster found newest
    read -r version cluster <"$record" 2>/dev/null ||
      die "kafka: $dir/data holds a Kafka data directory this script did not format; remove it (./messagescheduler.sh -c removes the stack's data) or set SM_STACK_DIR elsewhere"
    found="$(sed -n 's/^cluster.id=//p' "$meta")"
    [ "$found" = "$cluster" ] ||
      die "kafka: $dir/data belongs to cluster $found, not to $cluster that this stack formatted; it was not touched (./messagescheduler.sh -c removes the stack's data)"
    newest="$(printf '%s\n%s\n' "$version" "$KAFKA_VERSION" | sort -V | tail -n 1)"
    if [ "$version" != "$KAFKA_VERSION" ]; then
      [ "$newest" = "$KAFKA_VERSION" ] ||
        die "kafka: $dir/data was formatted by Kafka $version, newer than $KAFKA_VERSION, which cannot read its metadata; run SM_KAFKA_VERSION=$version, or remove the data with ./messagescheduler.sh -c"
      log "kafka: $dir/data was formatted by Kafka $version; $KAFKA_VERSION runs it at that metadata version"
    fi
    return 0
  fi
  local cluster
  # As Kafka's own Uuid.randomUuid: never starting with '-', which StorageTool would take for an
  # option.
  cluster="$(python3 -c 'import base64, uuid
while (c := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"): pass
print(c)')"
  kafka_java "$dir"
  "${KAFKA_JAVA[@]}" kafka.tools.StorageTool format -t "$cluster" -c "$dir/server.properties" \
    --standalone >>"$dir/logs/format.log" 2>&1 ||
    { tail -n 20 "$dir/logs/format.log" >&2; die "kafka: formatting $dir/data failed (log: $dir/logs/format.log)"; }
  echo "$KAFKA_VERSION $cluster" >"$record"
}

# kafka_metadata PORT: one metadata request to the broker on 127.0.0.1:PORT; prints its cluster id
# and how many brokers it lists (fails when it does not answer within 2 s).
kafka_metadata() {
  "$STACK/venv/bin/python" - "$1" <<'EOF' 2>/dev/null
import sys
from confluent_kafka.admin import AdminClient
admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{sys.argv[1]}", "log_level": 0})
md = admin.list_topics(timeout=2)
print(md.cluster_id, len(md.brokers))
EOF
}

# kafka_ready NAME PORT DIR: waits until the broker answers a metadata request that lists itself,
# for the cluster DIR was formatted for (an open port is not enough: the broker listens before it
# can answer); stops the script with the last lines of its log when it exits or takes a minute.
kafka_ready() {
  local name=$1 port=$2 dir=$3 pid cluster answer i
  pid="$(cat "$STACK/pids/$name.pid" 2>/dev/null || true)"
  read -r _ cluster <"$dir/formatted-by"
  for i in $(seq 1 120); do
    answer="$(kafka_metadata "$port" || true)"
    if [ "${answer% *}" = "$cluster" ] && [ "${answer#* }" -ge 1 ] 2>/dev/null; then
      log "$name: Apache Kafka $(kafka_version_of "$dir") answers on 127.0.0.1:$port (cluster $cluster)"
      return 0
    fi
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$dir/logs/server.log" "$STACK/logs/$name.log" >&2 2>/dev/null || true
      die "$name exited during start-up (log: $dir/logs/server.log)"
    fi
    sleep 0.5
  done
  tail -n 20 "$dir/logs/server.log" >&2 2>/dev/null || true
  die "$name did not answer a metadata request on 127.0.0.1:$port within 60 s (log: $dir/logs/server.log)"
}

# The version the broker in DIR says it runs (its log's last "Kafka version" line).
kafka_version_of() {
  grep -o 'Kafka version: [^ ]*' "$1/logs/server.log" 2>/dev/null | tail -n 1 | cut -d' ' -f3
}

# start_broker NAME DIR PORT CONTROLLER_PORT: a local broker as a process of this script's.
start_broker() {
  local name=$1 dir=$2 port=$3 cport=$4
  ensure_kafka
  ensure_secantus
  pid_ours "$name" || port_free_for "$name" "$cport" ||
    die "$name: the controller port 127.0.0.1:$cport is held by a broker this checkout did not start; set SM_KAFKA_CONTROLLER_PORT"
  kafka_setup "$dir" "$port" "$cport"
  kafka_java "$dir"
  SERVER_LOG="$dir/logs/server.log" start "$name" "$port" "$dir" "${KAFKA_JAVA[@]}" kafka.Kafka \
    "$dir/server.properties"
  kafka_ready "$name" "$port" "$dir"
}

start_kafka() {
  if [ -n "$EXTERNAL_KAFKA" ]; then
    log "kafka: using $EXTERNAL_KAFKA (SM_BOOTSTRAP_SERVERS); no local broker started"
    return 0
  fi
  pid_ours kafka || port_free_for kafka "$KAFKA_PORT" || return 0
  start_broker kafka "$STACK/kafka" "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A broker of the test run's own, on free ports with an empty data directory, stopped (by PID)
# and removed when the run ends, even when it fails: no topic, group or backlog of the main job
# or of an earlier run is in play, and the stack's broker is left alone. Started and stopped like
# every other process of the script (`start`, `stop_one`).
start_test_broker() {
  local port cport
  port="$(free_port)"
  cport="$(free_port)"
  mkdir -p "$STACK"
  TEST_KAFKA_DIR="$(mktemp -d "$STACK/test-kafka.XXXXXX")"
  trap stop_test_broker EXIT
  trap "exit 130" INT TERM
  start_broker test-kafka "$TEST_KAFKA_DIR" "$port" "$cport"
  KAFKA_PORT=$port
}

stop_test_broker() {
  [ -f "$STACK/pids/test-kafka.pid" ] && stop_one test-kafka
  rm -rf "${TEST_KAFKA_DIR:?}"
}

# ---- MongoDB (SecantusDB) ----------------------------------------------------------------------

start_mongo() {
  if [ -n "$EXTERNAL_MONGO" ]; then
    log "mongo: using SM_MONGODB_URI; no local server started"
    return 0
  fi
  pid_ours mongo || port_free_for mongo "$MONGO_PORT" || return 0
  ensure_secantus
  start mongo "$MONGO_PORT" "$STACK/mongo" "$STACK/venv/bin/secantusd-py" \
    --host 127.0.0.1 --port "$MONGO_PORT" --storage-path "$STACK/mongo"
}

# ---- MySQL (MariaDB) ---------------------------------------------------------------------------

# The project's own database and account: every component and test signs in with them, never as
# root (Debian's root signs in by unix socket only). Test databases are named with the same prefix.
MYSQL_DATABASE=messagescheduler
MYSQL_USER=messagescheduler

# Debian's mariadbd refuses to run as root: as root it runs as the mysql user (as Debian's service
# does), and its data directory is then that user's.
mysql_user_args() {
  [ "$(id -u)" -eq 0 ] && echo "--user=mysql"
  return 0
}

# A MariaDB server of the stack's own: its data directory (initialised once), port and socket, no
# option file of the system's (--no-defaults), listening on 127.0.0.1 only.
start_mysql() {
  if [ -n "$EXTERNAL_MYSQL" ]; then
    log "mysql: using SM_MYSQL_URL; no local server started"
    return 0
  fi
  if ! pid_ours mysql; then
    port_free_for mysql "$MYSQL_PORT"
    apt_install mariadb-server
    local user_arg
    user_arg="$(mysql_user_args)"
    mkdir -p "$MYSQL_DIR"
    if [ -n "$user_arg" ]; then
      chown mysql: "$MYSQL_DIR"
      runuser -u mysql -- test -w "$MYSQL_DIR" ||
        die "mysql: MariaDB runs as the mysql user, which cannot reach $MYSQL_DIR (a parent directory is closed to it); set SM_MYSQL_DIR to a directory it can reach"
    fi
    if [ ! -d "$MYSQL_DIR/data/mysql" ]; then
      log "mysql: initialising a MariaDB data directory in $MYSQL_DIR/data"
      mkdir -p "$STACK/logs"
      # shellcheck disable=SC2086 # user_arg is one word or none
      mariadb-install-db --no-defaults --datadir="$MYSQL_DIR/data" $user_arg \
        --auth-root-authentication-method=socket --auth-root-socket-user="$(id -un)" \
        --skip-test-db >>"$STACK/logs/mysql.log" 2>&1 ||
        { tail -n 20 "$STACK/logs/mysql.log" >&2; die "mysql: mariadb-install-db failed (log: $STACK/logs/mysql.log)"; }
    fi
    # shellcheck disable=SC2086
    start mysql "$MYSQL_PORT" "$MYSQL_DIR" /usr/sbin/mariadbd --no-defaults $user_arg \
      --datadir="$MYSQL_DIR/data" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
      --socket="$MYSQL_DIR/mysqld.sock" --pid-file="$MYSQL_DIR/mariadbd.pid" --skip-name-resolve
  fi
  mysql_account
}

# The project's database and account, created (or its password set again) over the server's
# socket by the account mariadb-install-db gave the user who runs this script (root, or a non-root
# user: --auth-root-socket-user); the password is made once and kept in the stack's directory,
# readable by its owner only.
mysql_account() {
  local pw_file="$MYSQL_DIR/password"
  if [ ! -s "$pw_file" ]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr '+/' '-_' >"$pw_file")
  fi
  MYSQL_PASSWORD="$(cat "$pw_file")"
  mysql --no-defaults --protocol=socket --socket="$MYSQL_DIR/mysqld.sock" -u "$(id -un)" <<EOF ||
CREATE DATABASE IF NOT EXISTS \`$MYSQL_DATABASE\`;
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'127.0.0.1' IDENTIFIED BY '$MYSQL_PASSWORD';
ALTER USER '$MYSQL_USER'@'127.0.0.1' IDENTIFIED BY '$MYSQL_PASSWORD';
GRANT ALL PRIVILEGES ON \`${MYSQL_DATABASE}%\`.* TO '$MYSQL_USER'@'127.0.0.1';
EOF
    die "mysql: could not create the project's database and account as root over $MYSQL_DIR/mysqld.sock"
}

# The stack's servers (each started only when not given from outside); the Python environment is
# installed by the servers that need it (the broker's readiness check, SecantusDB).
stack() {
  mkdir -p "$STACK"
  ensure_build_deps
  start_kafka
  start_mongo
  start_mysql
}

# seconds_of NAME DURATION: DURATION in whole seconds, rounded up, read as the services read theirs
# (humantime's grammar: one or more spans such as 500ms, 1.5s, 20s, 1m, 1h, 2days or "1m 30s").
# Anything else stops the script, naming the setting; nothing in it is evaluated.
seconds_of() {
  local rest=$2 ns=0 n frac digits unit per scale
  [[ "$rest" =~ [0-9] ]] || die "$1=$2 is not a duration such as 500ms, 20s, 1m or 1h"
  while [[ "$rest" =~ ^[[:space:]]*([0-9]{1,9})(\.([0-9]{1,9}))?[[:space:]]*([A-Za-z]+)(.*)$ ]]; do
    n=$((10#${BASH_REMATCH[1]}))
    digits=${BASH_REMATCH[3]}
    unit=${BASH_REMATCH[4]}
    rest=${BASH_REMATCH[5]}
    case "$unit" in
      nanos|nsec|ns) per=1 ;;
      usec|us) per=1000 ;;
      millis|msec|ms) per=1000000 ;;
      seconds|second|secs|sec|s) per=1000000000 ;;
      minutes|minute|min|mins|m) per=60000000000 ;;
      hours|hour|hr|hrs|h) per=3600000000000 ;;
      days|day|d) per=86400000000000 ;;
      weeks|week|wk|wks|w) per=604800000000000 ;;
      months|month|M) per=2630016000000000 ;;
      years|year|yr|yrs|y) per=31557600000000000 ;;
      *) die "$1=$2: unknown unit '$unit' (ns, us, ms, s, m, h, d, w, M or y, e.g. 500ms, 20s, 1m, 1h)" ;;
    esac
    # Past about 146 years the sum would overflow 64 bits.
    [ "$n" -lt $(((1 << 62) / per - ns / per)) ] || die "$1=$2 is too long"
    ns=$((ns + n * per))
    [ -z "$digits" ] || [ "$per" -gt 1 ] || die "$1=$2: a fraction of a nanosecond"
    if [ -n "$digits" ]; then
      # The unit's fraction, truncated to whole nanoseconds as humantime does.
      frac=$((10#$digits))
      scale=$((10 ** ${#digits}))
      if [ $((per % scale)) -eq 0 ]; then
        ns=$((ns + frac * (per / scale)))
      else
        ns=$((ns + frac * per / scale))
      fi
    fi
  done
  [[ "$rest" =~ ^[[:space:]]*$ ]] ||
    die "$1=$2 is not a duration such as 500ms, 20s, 1m or 1h (a number and its unit, for each span)"
  echo $(((ns + 999999999) / 1000000000))
}

# A clean stop of the scheduler takes up to its SM_SHUTDOWN_TIMEOUT (20 s by default); the other
# services stop in moments, the broker in a few seconds (a controlled shutdown). SIGKILL only after
# that and 10 s more.
SHUTDOWN_TIMEOUT_S="$(seconds_of SM_SHUTDOWN_TIMEOUT "${SM_SHUTDOWN_TIMEOUT:-20s}")"
STOP_GRACE_S=$((SHUTDOWN_TIMEOUT_S + 10))

# stop_one NAME: SIGTERM to the process we started (its PID still running the command line we
# recorded), SIGKILL after the grace period; start-stop-daemon waits until it is gone.
stop_one() {
  local name=$1 pid
  pid="$(cat "$STACK/pids/$name.pid" 2>/dev/null || true)"
  if pid_ours "$name" && [ "$DRY_RUN" -eq 1 ]; then
    log "would stop $name (pid $pid)"
    return 0
  elif pid_ours "$name"; then
    log "stopping $name (pid $pid)"
    if ! start-stop-daemon --stop --quiet --oknodo --pid "$pid" --retry "TERM/$STOP_GRACE_S"; then
      log "$name did not stop within ${STOP_GRACE_S} s; killing it"
      start-stop-daemon --stop --quiet --oknodo --pid "$pid" --signal KILL --retry 5 ||
        die "$name (pid $pid) survived SIGKILL"
    fi
  elif pid_alive "$name"; then
    log "$name: pid $pid is no longer the process we started; leaving it alone"
  fi
  [ "$DRY_RUN" -eq 1 ] || rm -f "$STACK/pids/$name.pid" "$STACK/pids/$name.cmd" "$STACK/pids/$name.built"
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

# Where the services and tests find the servers: those given from outside as they are, the local
# ones by port; the broker's classpath for the brokers tests start themselves.
export_env() {
  export SM_BOOTSTRAP_SERVERS="${EXTERNAL_KAFKA:-127.0.0.1:$KAFKA_PORT}"
  export SM_MONGODB_URI="${EXTERNAL_MONGO:-mongodb://127.0.0.1:$MONGO_PORT}"
  export SM_MYSQL_URL="${EXTERNAL_MYSQL:-mysql://$MYSQL_USER:$MYSQL_PASSWORD@127.0.0.1:$MYSQL_PORT/$MYSQL_DATABASE}"
  export SM_KAFKA_HOME="$KAFKA_HOME"
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

# Go 1.24 or newer runs compose/check, the test that validates the compose files with compose-go
# (the loader of `docker compose config`). Debian 12's golang-go (1.19) is too old to build it.
ensure_go() {
  local version
  command -v go >/dev/null ||
    die "the compose files' test needs Go 1.24 or newer (compose/check, compose-go): install it from https://go.dev/dl or your distribution and retry"
  version="$(go env GOVERSION | sed 's/^go//')"
  [ "$(printf '%s\n%s\n' 1.24 "$version" | sort -V | head -n 1)" = 1.24 ] ||
    die "the compose files' test needs Go 1.24 or newer; $(command -v go) is $version"
}

run_tests() {
  mkdir -p "$STACK"
  ensure_build_deps
  ensure_go
  ensure_secantus
  # The tests that stop and restart a broker start brokers of their own from this classpath.
  ensure_kafka
  if [ -n "$EXTERNAL_KAFKA" ]; then
    log "kafka: the tests use $EXTERNAL_KAFKA (SM_BOOTSTRAP_SERVERS); no test broker started"
  else
    start_test_broker
  fi
  start_mongo
  start_mysql
  ensure_web_test
  export_env
  log "running the workspace's tests"
  (cd "$ROOT" && cargo test --workspace --all-targets 9>&-)
}

# ---- one run at a time -------------------------------------------------------------------------

# take_lock ARGS...: one run that changes something per stack directory. A second run while one
# holds the lock says who holds it and exits (two runs starting the same server would race for its
# port and PID file). The lock is a file descriptor of this script's: it ends with the script,
# whatever kills it, and the servers it starts do not inherit it (start-stop-daemon closes it). A
# short-lived child of a run that was killed (a `sleep`, a probe of a port) may hold it a moment
# longer: when the run that took it is gone, the lock is waited for, briefly.
take_lock() {
  mkdir -p "$STACK"
  exec 9<>"$STACK/lock"
  if ! flock -n 9; then
    local holder holder_pid
    holder="$(head -c 400 "$STACK/lock" | tr -d '\n')"
    holder_pid="$(sed -n 's/^pid \([0-9]*\) .*/\1/p' "$STACK/lock" | head -n 1)"
    if [ -n "$holder_pid" ] && ! kill -0 "$holder_pid" 2>/dev/null && flock -w 5 9; then
      log "the run that last held $STACK/lock ($holder) is gone; going ahead"
    else
      die "another run of this script is using $STACK: $holder; wait for it to end (or stop it), then retry"
    fi
  fi
  printf 'pid %s since %s: %s\n' "$$" "$(date -u +%FT%TZ)" "$ROOT/messagescheduler.sh $*" >"$STACK/lock"
}

release_lock() { exec 9>&-; }

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
BIN_DIR="$(realpath -m -- "${SM_BIN_DIR:-$ROOT/target/release}")"
# The scheduler's index of ids (a cache of the state topic): -c removes it.
STATE_DIR="$(realpath -m -- "${SM_STATE_DIR:-$STACK/scheduler-state}")"
SCHEDULER_PORT="${SM_SCHEDULER_PORT:-8000}"

build_release() {
  if [ -n "${SM_BIN_DIR:-}" ]; then
    log "running the binaries in $BIN_DIR (SM_BIN_DIR): nothing to build"
    return 0
  fi
  log "building the release binaries"
  (cd "$ROOT" && cargo build --release --bins --quiet 9>&-)
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
  SM_HTTP_ADDR="127.0.0.1:$SCHEDULER_PORT" SM_STATE_DIR="$STATE_DIR" start scheduler "$SCHEDULER_PORT" "$STACK/run" "$BIN_DIR/scheduler"
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
  stop_all
}

# -c: what this project built and ran (its release binaries, the stack's data, logs and PID files,
# the scheduler's index of ids, the data of a test broker a killed run left behind; with Docker the
# compose project's volumes), said out loud; not the rest of target/, nor what is installed (the
# Python environment, the broker's classpath). -dc: everything, said out loud.
clean() {
  local deep=$1
  stop
  if [ "$deep" -eq 1 ]; then
    log "deep clean: removing $ROOT/target (all build artefacts), $STACK (data, logs, the Python venv), $MYSQL_DIR (MariaDB's data) and $KAFKA_HOME (the broker's classpath)"
    if use_docker; then
      log "and the compose project's containers, volumes and locally built images"
      WITH_GRAFANA=1 WITH_GUI=1 compose down --volumes --rmi local --remove-orphans
    fi
    run rm -rf "$ROOT/target" "$STACK" "$MYSQL_DIR" "$KAFKA_HOME"
    return 0
  fi
  if use_docker; then
    log "removing the compose project's volumes (Kafka's, MongoDB's and MySQL's data, the scheduler's index of ids)"
    WITH_GRAFANA=1 WITH_GUI=1 compose down --volumes --remove-orphans
  fi
  local gone=(
    "$STACK/kafka" "$STACK/mongo" "$MYSQL_DIR" "$STACK/prometheus" "$STACK/run"
    "$STACK/logs" "$STACK/pids"
  )
  local leftover test_brokers=""
  for leftover in "$STACK"/test-kafka.*; do
    [ -e "$leftover" ] && gone+=("$leftover") && test_brokers=", the data of a test broker a killed run left behind"
  done
  local built=""
  if [ -z "${SM_BIN_DIR:-}" ]; then
    gone+=("$BIN_DIR/scheduler" "$BIN_DIR/db-scheduler" "$BIN_DIR/messenger")
    built="the release binaries ($BIN_DIR/{scheduler,db-scheduler,messenger}), "
  else
    log "kept: the binaries in $BIN_DIR (SM_BIN_DIR: this script did not build them)"
  fi
  local index=""
  if [ -z "${SM_STATE_DIR:-}" ]; then
    gone+=("$STATE_DIR")
    index="the scheduler's index of ids ($STATE_DIR), "
  else
    log "kept: the scheduler's index of ids in $STATE_DIR (SM_STATE_DIR: yours; it is rebuilt from Kafka when removed)"
  fi
  log "removing: ${built}${index}the broker's data ($STACK/kafka), MongoDB's ($STACK/mongo), MariaDB's with the project's password ($MYSQL_DIR), Prometheus's data, the services' working directory, logs and PID files$test_brokers"
  run rm -rf "${gone[@]}"
  if [ -d "$STACK/venv" ]; then
    log "kept: $STACK/venv (installed software: SecantusDB and confluent-kafka; -dc removes it) and $KAFKA_HOME (the broker's classpath; -dc removes it)"
  fi
  # The lock last: this run is over.
  run rm -f "$STACK/lock"
}

main() {
  local action="" given="" progress_after=0 args=("$@")
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
    stack|test|progress|progress-live)
      # These change nothing a dry run could print instead (-p, -pl), or their work is what
      # they run (--stack, --test): refused rather than run.
      [ "$DRY_RUN" -eq 0 ] || die "--dry-run has nothing to print for $given: run it without --dry-run"
      ;;
  esac
  case "$action" in
    progress|progress-live) ;;
    *) [ "$DRY_RUN" -eq 1 ] || take_lock "${args[@]}" ;;
  esac
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
        # Watching changes nothing: another run may stop or clean meanwhile.
        release_lock
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

# Sourced (by the tests, to check a function against the services' own parsing), it only defines.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
