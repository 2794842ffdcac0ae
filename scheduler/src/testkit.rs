//! Helpers for integration tests of every crate in the workspace (feature `testkit`): they talk
//! to the real broker `./messagescheduler.sh --test` starts for the run (SM_BOOTSTRAP_SERVERS,
//! default 127.0.0.1:9092), or to brokers of their own ([`Broker`]). Every test uses its own topics and group, so tests run in parallel
//! without seeing each other's records. Test code: a failed set-up panics with a message.
#![allow(clippy::missing_panics_doc)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kafka::TopicSpec;
use crate::{Config, Scheduler, Settings, SystemClock};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub fn bootstrap() -> String {
    std::env::var("SM_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A name no other test (or earlier run) uses.
pub fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{name}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        now_ms() % 1_000_000_000
    )
}

/// One test's topics and group.
#[derive(Clone, Debug)]
pub struct Names {
    pub ingest: String,
    pub dlq: String,
    pub prefix: String,
    pub group: String,
    pub target: String,
}

impl Names {
    pub fn new(test: &str) -> Names {
        let base = unique(test);
        Names {
            ingest: format!("sched-{base}"),
            dlq: format!("sched-{base}.DLQ"),
            prefix: format!("__SM_SLICE_T{}", base.replace('-', "_")),
            group: format!("group-{base}"),
            target: format!("target-{base}"),
        }
    }

    /// The scheduler's flags for these names and a small, fast ladder: 400 ms to 6.4 s, ratio 2
    /// (five levels), so a few seconds of delay cross every level. The 150 ms safety margin covers
    /// the broker's produce latency while the whole suite loads the machine.
    pub fn args(&self) -> Vec<String> {
        [
            "--bootstrap-servers",
            &bootstrap(),
            "--http-addr",
            "127.0.0.1:0",
            "--group-id",
            &self.group,
            "--ingest-topic",
            &self.ingest,
            "--slice-prefix",
            &self.prefix,
            "--smallest-slice",
            "400ms",
            "--slice-ratio",
            "2",
            "--largest-slice",
            "6400ms",
            "--safety-margin",
            "150ms",
            // The reach of this ladder's finest swept level (w1 + lead1): a record a few seconds
            // ahead crosses the slices, as the tests mean it to, instead of waiting in memory
            // for the default 6 s.
            "--hold-horizon",
            "1200ms",
            "--ingest-partitions",
            "4",
            "--slice-partitions",
            "2",
            "--workers",
            "4",
            // The index of ids of a test's processes, beside each other, out of $HOME.
            "--state-dir",
            &std::env::temp_dir()
                .join("sm-test-state")
                .join(&self.group)
                .to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    pub fn settings(&self) -> Settings {
        self.settings_with(&[])
    }

    /// The flags with `extra` applied: a flag given in `extra` replaces the default's value
    /// (`-X` properties add up).
    pub fn args_with(&self, extra: &[&str]) -> Vec<String> {
        with_flags(&self.args(), extra)
    }

    /// The settings with `extra` flags applied (see [`Names::args_with`]).
    pub fn settings_with(&self, extra: &[&str]) -> Settings {
        let mut argv = vec!["scheduler".to_string()];
        argv.extend(self.args_with(extra));
        Settings::new(<Config as clap::Parser>::parse_from(argv)).expect("test settings are valid")
    }
}

/// `defaults` (flag-value pairs) with `extra` applied: a `--flag` given in `extra` replaces the
/// default's value; anything else (`-X` properties) adds up.
pub fn with_flags(defaults: &[String], extra: &[&str]) -> Vec<String> {
    let overridden: Vec<&str> = extra
        .iter()
        .copied()
        .filter(|a| a.starts_with("--"))
        .collect();
    let mut out: Vec<String> = defaults
        .chunks(2)
        .filter(|pair| !overridden.contains(&pair[0].as_str()))
        .flatten()
        .cloned()
        .collect();
    out.extend(extra.iter().map(|s| s.to_string()));
    out
}

pub async fn start_in_process(names: &Names) -> Scheduler {
    start_in_process_with(names, &[]).await
}

/// Logs of in-process servers go to the test's output, filtered by `RUST_LOG` (default: warn).
pub fn init_test_logging() {
    use tracing_subscriber::EnvFilter;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub async fn start_in_process_with(names: &Names, extra: &[&str]) -> Scheduler {
    init_test_logging();
    Scheduler::start(names.settings_with(extra), Arc::new(SystemClock))
        .await
        .expect("scheduler starts")
}

/// A child process that is killed (SIGKILL) when dropped, so a test that panics leaves none
/// behind. Derefs to the [`Child`].
pub struct ChildGuard(Child);

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl From<Child> for ChildGuard {
    fn from(child: Child) -> Self {
        ChildGuard(child)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Already reaped (killed or stopped by the test): both calls fail harmlessly.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a service binary as a child process (for kill -9 tests and the benchmark). Its stderr
/// goes to `log` in the temporary directory, filtered by `RUST_LOG` (default info). A process
/// started again under the same log name appends to it, so that what a killed predecessor said
/// is still there to read when a test fails.
pub fn spawn_binary(binary: &str, args: &[String], log: &str) -> ChildGuard {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(std::env::temp_dir().join(log))
        .expect("log file");
    let child = Command::new(binary)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("scheduler binary starts");
    ChildGuard(child)
}

/// The password the secrets tests plant in every secret input of a binary, to look for in all it
/// prints.
pub const PLANTED_PASSWORD: &str = "PlantedPassw0rd";

/// Panics, showing `output`, when it carries [`PLANTED_PASSWORD`].
/// A scheduler process (`binary`) on its own HTTP port and index, as two processes on one
/// machine get by default, so that a restart on the same port reopens the index its
/// predecessor left.
pub fn spawn_on_port(
    binary: &str,
    names: &Names,
    log: &str,
    http: u16,
    extra: &[&str],
) -> ChildGuard {
    let dir = std::env::temp_dir()
        .join("sm-test-state")
        .join(format!("{}-{http}", names.group));
    let http_addr = format!("127.0.0.1:{http}");
    let dir = dir.to_string_lossy();
    let mut flags = vec!["--http-addr", &http_addr, "--state-dir", &dir];
    flags.extend_from_slice(extra);
    spawn_binary(binary, &names.args_with(&flags), log)
}

/// `GET /api/schedules/{id}` of the process whose HTTP API is on `port`; `Null` while it does
/// not answer (it may be restarting).
pub async fn schedule_status(port: u16, id: &str) -> serde_json::Value {
    match reqwest::get(format!("http://127.0.0.1:{port}/api/schedules/{id}")).await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

/// Waits until a child process's `/healthz` on `port` answers `ok` (it may not listen yet).
pub async fn answers_ok(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = match reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await {
            Ok(r) => r.json::<serde_json::Value>().await.ok(),
            Err(_) => None,
        };
        if h.as_ref().is_some_and(|h| h["status"] == "ok") {
            return;
        }
        assert!(Instant::now() < deadline, ":{port} is not ok: {h:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn assert_no_planted_password(output: &str) {
    assert!(
        !output.contains(PLANTED_PASSWORD),
        "the password shows:\n{output}"
    );
}

/// Runs a service binary to its end with no environment but `env` (none of the test run's own
/// `SM_*` settings), and returns its exit status and all it wrote, stdout and stderr in the order
/// written. Panics, with what it wrote so far, if it still runs after `within` (and kills it).
pub fn run_binary(
    binary: &str,
    args: &[&str],
    env: &[(&str, &str)],
    within: Duration,
) -> (std::process::ExitStatus, String) {
    let path = std::env::temp_dir().join(format!("{}.out", unique("run-binary")));
    let out = std::fs::File::create(&path).expect("output file");
    let err = out.try_clone().expect("output file");
    let mut child = ChildGuard(
        Command::new(binary)
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("binary starts"),
    );
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().expect("child's status") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(child);
    let output = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    let status = status
        .unwrap_or_else(|| panic!("{binary} still runs after {within:?}; it wrote:\n{output}"));
    (status, output)
}

/// A TCP port that was free a moment ago, for a server a test starts itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The local broker's configuration, with `@PORT@`, `@CONTROLLER_PORT@` and `@DATA_DIR@` to fill:
/// the file `messagescheduler.sh` starts the stack's broker with, so that a test's broker is
/// configured as the stack's.
const SERVER_PROPERTIES: &str = include_str!("../../broker/server.properties");

/// The Kafka version `broker/pom.xml` pins (the classpath the script collects is named by it), the
/// version of every broker [`Broker::start`] starts.
pub fn kafka_version() -> &'static str {
    const POM: &str = include_str!("../../broker/pom.xml");
    POM.split_once("<kafka.version>")
        .and_then(|(_, rest)| rest.split_once("</kafka.version>"))
        .map(|(v, _)| v)
        .expect("broker/pom.xml pins <kafka.version>")
}

/// Where `./messagescheduler.sh` keeps the broker's classpath: `SM_KAFKA_HOME` (the script exports
/// it to the tests), else its default for the pinned version.
fn kafka_home() -> std::path::PathBuf {
    if let Some(home) = std::env::var_os("SM_KAFKA_HOME") {
        return home.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME is set");
    cache
        .join("messagescheduler")
        .join(format!("kafka-{}", kafka_version()))
}

/// A broker a test or benchmark started itself: Apache Kafka in KRaft mode (one JVM, broker and
/// controller), from the classpath `./messagescheduler.sh` collects, configured as the stack's
/// broker, with its data in a directory of its own so that it keeps records and offsets across a
/// kill. Killed when dropped, so a failing test leaves no process behind.
pub struct Broker {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Broker {
    /// Formats a new data directory and starts a broker on free ports; returns once it answers a
    /// metadata request.
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    /// [`Broker::start`] with more `server.properties` lines (`key=value`), as an operator's
    /// cluster might differ from the stack's (e.g. `auto.create.topics.enable=false`).
    pub fn start_with(extra: &[&str]) -> Broker {
        let dir = std::env::temp_dir().join(unique("broker"));
        std::fs::create_dir_all(dir.join("logs")).expect("broker directory");
        let (port, controller_port) = (free_port(), free_port());
        let mut properties = SERVER_PROPERTIES
            .replace("@PORT@", &port.to_string())
            .replace("@CONTROLLER_PORT@", &controller_port.to_string())
            .replace("@DATA_DIR@", &dir.join("data").to_string_lossy());
        for line in extra {
            properties.push_str(line);
            properties.push('\n');
        }
        std::fs::write(dir.join("server.properties"), properties).expect("server.properties");
        // As Kafka's own Uuid.randomUuid: base64 of 16 random bytes, never starting with '-'
        // (StorageTool would read it as an option, one format in 64).
        let cluster_id = loop {
            use base64::Engine;
            let id =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
            if !id.starts_with('-') {
                break id;
            }
        };
        let format = Broker::java(&dir)
            .args(["kafka.tools.StorageTool", "format", "--standalone", "-t"])
            .arg(&cluster_id)
            .arg("-c")
            .arg(dir.join("server.properties"))
            .output()
            .expect("java runs (./messagescheduler.sh --stack installs it)");
        assert!(
            format.status.success(),
            "formatting {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&format.stderr)
        );
        let child = Broker::spawn(&dir, port);
        Broker { child, dir, port }
    }

    /// The JVM with the broker's classpath, heap and logging (to `dir/logs/server.log`).
    fn java(dir: &std::path::Path) -> Command {
        let home = kafka_home();
        assert!(
            home.join("libs").is_dir(),
            "no Kafka classpath in {} (./messagescheduler.sh --stack collects it)",
            home.display()
        );
        let heap = std::env::var("SM_KAFKA_HEAP").unwrap_or_else(|_| "512m".into());
        let mut java = Command::new("java");
        java.arg(format!("-Xms{heap}"))
            .arg(format!("-Xmx{heap}"))
            .args(["-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"])
            .args(["-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"])
            .arg(format!(
                "-Dlog4j2.configurationFile={}/../broker/log4j2.properties",
                env!("CARGO_MANIFEST_DIR")
            ))
            .arg(format!("-Dkafka.logs.dir={}", dir.join("logs").display()))
            .arg("-cp")
            .arg(format!("{}/libs/*", home.display()));
        java
    }

    /// Starts the broker of `dir` on `port` and waits until it answers a metadata request that
    /// lists itself (it listens before it can answer).
    fn spawn(dir: &std::path::Path, port: u16) -> Child {
        let mut child = Broker::java(dir)
            .arg("kafka.Kafka")
            .arg(dir.join("server.properties"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("java runs");
        let client: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", format!("127.0.0.1:{port}"))
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Emerg)
            .create()
            .expect("metadata client");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("logs/server.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!("the broker exited ({status}) during start-up: {tail:#?}");
            }
            match client.fetch_metadata(None, Duration::from_millis(500)) {
                Ok(md) if !md.brokers().is_empty() => return child,
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        kill9(&mut child);
        panic!("the broker did not answer a metadata request on {port} within 60 s");
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id (to read its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (no controlled shutdown, nothing flushed), `down` of silence, then the same broker
    /// again on the same ports and data directory.
    pub fn kill_and_restart(&mut self, down: Duration) {
        self.kill();
        std::thread::sleep(down);
        self.start_again();
    }

    /// SIGKILL, nothing flushed; [`Broker::start_again`] brings it back.
    pub fn kill(&mut self) {
        kill9(&mut self.child);
    }

    /// The same broker again on the same ports and data directory, after [`Broker::kill`].
    pub fn start_again(&mut self) {
        self.child = Broker::spawn(&self.dir, self.port);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        kill9(&mut self.child);
        if std::thread::panicking() {
            // A failing test's broker log is what explains a transaction or a group that hung.
            eprintln!(
                "the test failed: its broker's directory is kept, {}",
                self.dir.display()
            );
            let log = std::fs::read_to_string(self.dir.join("logs/server.log")).unwrap_or_default();
            for line in log.lines().filter(|l| l.contains("likely deleted already")) {
                eprintln!("the broker left a transaction hanging: {line}");
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// SIGKILL: no shutdown hook runs, nothing is flushed or committed.
pub fn kill9(child: &mut Child) {
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
}

pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_with(name, partitions, &[]).await
}

pub async fn create_topic_with(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    create_topic_on(&bootstrap(), name, partitions, configs).await
}

/// Creates a topic on the broker at `bootstrap` (an existing one is fine), and returns once its
/// partitions are served ([`crate::kafka::create_topics`]).
pub async fn create_topic_on(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) {
    let spec = configs
        .iter()
        .fold(TopicSpec::new(name, partitions), |t, (k, v)| t.with(k, v));
    crate::kafka::create_topics(crate::kafka::client_config(bootstrap, &[]), &[spec], 1)
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e}"));
}

/// A topic's configuration value for `key` as the broker describes it (its default if unset).
pub async fn topic_config(name: &str, key: &str) -> Option<String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin");
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(name)], &AdminOptions::new())
        .await
        .expect("the broker answers");
    described
        .into_iter()
        .flatten()
        .flat_map(|resource| resource.entries)
        .find(|entry| entry.name == key)
        .and_then(|entry| entry.value)
}

/// Deletes a topic and returns once the broker's metadata no longer lists it (deletion is
/// asynchronous in Kafka: a topic created under the same name before then is refused).
pub async fn delete_topic(name: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        // Its metadata requests below must not make the topic again.
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("admin");
    let deleted = admin
        .delete_topics(&[name], &AdminOptions::new())
        .await
        .expect("the broker answers");
    for result in deleted {
        result.unwrap_or_else(|(topic, e)| panic!("deleting {topic}: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(name), Duration::from_secs(5))
            .expect("metadata");
        let listed = metadata
            .topics()
            .iter()
            .any(|t| t.name() == name && t.error().is_none());
        if !listed {
            return;
        }
        assert!(Instant::now() < deadline, "{name} still listed after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn producer() -> FutureProducer {
    producer_on(&bootstrap())
}

/// A producer for `bootstrap` (a broker other than the shared one, as in the broker fault tests).
pub fn producer_on(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer")
}

/// Produces one record and waits for its acknowledgement.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    value: &[u8],
    headers: &[(&str, &[u8])],
) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let mut rec = FutureRecord::to(topic).payload(value).headers(h);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    let delivery = producer
        .send(rec, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e);
    crate::kafka::confirmed(delivery).expect("produce acknowledged, with an offset");
}

/// `n` records `(prefix-i, due)` due between `base` and `base + spread_ms`, scattered (by a
/// multiplier prime to the spread) so that the order they are produced in is not their due order.
pub fn scattered(prefix: &str, n: i64, base: i64, spread_ms: i64) -> Vec<(String, i64)> {
    (0..n)
        .map(|i| (format!("{prefix}-{i}"), base + (i * 7_919) % spread_ms))
        .collect()
}

/// Schedules records `(id, due_ms)` to the test's target through its ingest topic, all at once
/// (key and `id` header = the id), and waits for every acknowledgement.
pub async fn schedule_records(names: &Names, records: &[(String, i64)]) {
    schedule_records_to(names, &names.target, records).await
}

/// [`schedule_records`] to the target topic `target`.
pub async fn schedule_records_to(names: &Names, target: &str, records: &[(String, i64)]) {
    let p = producer();
    futures::future::join_all(records.iter().map(|(id, due)| {
        let (p, time) = (&p, due.to_string());
        async move {
            let headers = [
                ("time", time.as_bytes()),
                ("topic", target.as_bytes()),
                ("id", id.as_bytes()),
            ];
            produce(
                p,
                &names.ingest,
                Some(id.as_bytes()),
                id.as_bytes(),
                &headers,
            )
            .await
        }
    }))
    .await;
}

/// A record as a test sees it on arrival.
#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The record's timestamp: when the scheduler produced it.
    pub timestamp_ms: i64,
    /// The test's clock when it read the record.
    pub received_ms: i64,
}

impl Received {
    /// The record's id: its `sm-id` header (set by the scheduler), else its key (a record that
    /// did not go through the scheduler, as in the benchmark's relay).
    pub fn id(&self) -> String {
        self.header("sm-id")
            .or_else(|| {
                self.key
                    .as_ref()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
            })
            .unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_ref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Reads every partition of `topic` from the beginning, without a group.
pub fn reader(topic: &str, partitions: i32) -> StreamConsumer {
    reader_on(&bootstrap(), topic, partitions)
}

/// [`reader`] on the broker at `bootstrap`.
pub fn reader_on(bootstrap: &str, topic: &str, partitions: i32) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    c.assign(&tpl).expect("assign");
    c
}

/// Collects records until `done` says so or the deadline passes.
pub async fn collect(
    consumer: &StreamConsumer,
    deadline: Duration,
    mut done: impl FnMut(&[Received]) -> bool,
) -> Vec<Received> {
    let end = Instant::now() + deadline;
    let mut out = Vec::new();
    while !done(&out) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => out.push(Received {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
                timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                received_ms: now_ms(),
            }),
            // The broker may be restarting (a fault test): keep reading until the deadline.
            Ok(Err(e)) => {
                eprintln!("reader: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => break,
        }
    }
    out
}

/// The sum over every label set of a counter or gauge on a process's `/metrics` page (0 when it
/// is not there yet).
pub async fn metric_sum(http: &str, name: &str) -> f64 {
    try_metric_sum(http, name).await.expect("metrics answer")
}

/// [`metric_sum`], or `None` while the process does not answer (it may be restarting).
pub async fn try_metric_sum(http: &str, name: &str) -> Option<f64> {
    let page = reqwest::get(format!("http://{http}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(metric_in(&page, name))
}

/// The sum over every label set of `name` in a Prometheus text page (0 when absent).
pub fn metric_in(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `/healthz` every 20 ms until its `status` is `status`: that answer, or the last one
/// seen when `within` passed first.
pub async fn health_reaches(http: &str, status: &str, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let h = healthz(http).await;
        if h["status"] == status || Instant::now() >= deadline {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A process's `/healthz` answer.
pub async fn healthz(http: &str) -> serde_json::Value {
    reqwest::get(format!("http://{http}/healthz"))
        .await
        .expect("healthz answers")
        .json()
        .await
        .expect("healthz is JSON")
}

/// Counts deliveries per `sm-id`.
pub fn by_id(records: &[Received]) -> HashMap<String, Vec<&Received>> {
    let mut map: HashMap<String, Vec<&Received>> = HashMap::new();
    for r in records {
        map.entry(r.header("sm-id").unwrap_or_default())
            .or_default()
            .push(r);
    }
    map
}

/// Lateness percentiles in ms (p50, p99, max) of arrivals against `sm-due-ms`, by the
/// workspace's one definition ([`crate::latency::Latency`]); 0 when nothing arrived.
pub fn lateness(records: &[Received]) -> (i64, i64, i64) {
    let s = crate::latency::Latency::of(
        records
            .iter()
            .filter_map(|r| Some(r.timestamp_ms - r.header("sm-due-ms")?.parse::<i64>().ok()?)),
    )
    .summary();
    (
        s.p50_ms.unwrap_or(0),
        s.p99_ms.unwrap_or(0),
        s.max_ms.unwrap_or(0),
    )
}

/// Produces a record whose first header name is arbitrary bytes (not UTF-8), plus `time` and
/// `topic`: rdkafka's safe API cannot write such a name, so this goes through librdkafka's C API,
/// as any other client could.
pub fn produce_with_raw_header_name(
    topic: &str,
    name: &[u8],
    time: &str,
    target: &str,
    value: &[u8],
) {
    use rdkafka::bindings as rd;
    use rdkafka::producer::{BaseProducer, Producer};
    use std::ffi::CString;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("producer");
    let topic = CString::new(topic).expect("topic");
    let name = CString::new(name).expect("no NUL in the name");
    let time_name = CString::new("time").expect("name");
    let topic_name = CString::new("topic").expect("name");
    let header = |name: &CString, val: &[u8]| rd::rd_kafka_vu_t {
        vtype: rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADER,
        u: rd::rd_kafka_vu_s__bindgen_ty_1 {
            header: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
                name: name.as_ptr(),
                val: val.as_ptr().cast(),
                size: val.len() as isize,
            },
        },
    };
    let vus = [
        rd::rd_kafka_vu_t {
            vtype: rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_TOPIC,
            u: rd::rd_kafka_vu_s__bindgen_ty_1 {
                cstr: topic.as_ptr(),
            },
        },
        rd::rd_kafka_vu_t {
            vtype: rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_VALUE,
            u: rd::rd_kafka_vu_s__bindgen_ty_1 {
                mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                    ptr: value.as_ptr() as *mut _,
                    size: value.len(),
                },
            },
        },
        header(&name, b"odd"),
        header(&time_name, time.as_bytes()),
        header(&topic_name, target.as_bytes()),
    ];
    // SAFETY: every pointer in `vus` outlives the call; librdkafka copies value and headers
    // (RD_KAFKA_MSG_F_COPY is the default for produceva), and the client handle is live.
    let err =
        unsafe { rd::rd_kafka_produceva(producer.client().native_ptr(), vus.as_ptr(), vus.len()) };
    assert!(err.is_null(), "produceva failed");
    producer.flush(Duration::from_secs(10)).expect("flushed");
}

/// Reads until every id in `expected` has arrived (counting `before`, read earlier), then a
/// moment longer so that late duplicates are seen too; returns `before` and everything read.
pub async fn collect_all<'a>(
    consumer: &StreamConsumer,
    expected: impl IntoIterator<Item = &'a String>,
    before: Vec<Received>,
    deadline: Duration,
) -> Vec<Received> {
    let arrived: std::collections::HashSet<String> = before.iter().map(Received::id).collect();
    let (after, _) = collect_ids(
        consumer,
        expected.into_iter().filter(|id| !arrived.contains(*id)),
        deadline,
    )
    .await;
    let rest = drain_to_end(consumer).await;
    before.into_iter().chain(after).chain(rest).collect()
}

/// Reads until every id in `expected` has arrived or `deadline` passes: what was read, and the
/// ids still missing.
pub async fn collect_ids<'a>(
    consumer: &StreamConsumer,
    expected: impl IntoIterator<Item = &'a String>,
    deadline: Duration,
) -> (Vec<Received>, std::collections::HashSet<String>) {
    let mut waiting: std::collections::HashSet<String> = expected.into_iter().cloned().collect();
    let mut seen = 0;
    let got = collect(consumer, deadline, |r| {
        for x in &r[seen..] {
            waiting.remove(&x.id());
        }
        seen = r.len();
        waiting.is_empty()
    })
    .await;
    (got, waiting)
}

/// Reads until the reader has every record its partitions held when called (their high
/// watermarks then): after the writers stopped, that is everything there is, duplicates
/// included, with no guessed pause. The reader's position counts, not only the records it got:
/// it passes transaction markers and aborted records, which it never hands out. Panics if that
/// takes over 60 s.
pub async fn drain_to_end(consumer: &StreamConsumer) -> Vec<Received> {
    let assignment = consumer.assignment().expect("the reader's assignment");
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for e in assignment.elements() {
        let tp = (e.topic().to_string(), e.partition());
        let (_, high) = tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(&tp.0, tp.1, Duration::from_secs(10))
        })
        .expect("high watermark");
        ends.insert(tp, high);
    }
    let topic = ends
        .keys()
        .next()
        .map(|tp| tp.0.clone())
        .unwrap_or_default();
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let reached = |next: &HashMap<(String, i32), i64>| {
        ends.iter()
            .all(|(tp, high)| next.get(tp).copied().unwrap_or(0) >= *high)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    loop {
        let positions = consumer.position().expect("the reader's positions");
        for e in positions.elements() {
            if let Some(at) = e.offset().to_raw().filter(|&o| o >= 0) {
                let n = next
                    .entry((e.topic().to_string(), e.partition()))
                    .or_insert(0);
                *n = (*n).max(at);
            }
        }
        if reached(&next) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "the reader did not reach the end of {topic} in 60 s"
        );
        let mut seen = 0;
        let batch = collect(consumer, Duration::from_millis(200), |r| {
            for x in &r[seen..] {
                let n = next.entry((topic.clone(), x.partition)).or_insert(0);
                *n = (*n).max(x.offset + 1);
            }
            seen = r.len();
            reached(&next)
        })
        .await;
        got.extend(batch);
    }
}

/// Fails the test if any expected id never arrived.
pub fn assert_all_arrived<'a>(expected: impl IntoIterator<Item = &'a String>, got: &[Received]) {
    let ids = by_id(got);
    let missing: Vec<&String> = expected
        .into_iter()
        .filter(|id| !ids.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}
