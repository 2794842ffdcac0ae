//! Configuration: flags and `SM_*` environment variables, validated once at start-up into
//! [`Settings`]. A bad value stops the start with a clear message; nothing falls back silently.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use serde::Serialize;

use crate::domain::InternalTopics;

/// The delivery guarantee (`--delivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    AtLeastOnce,
    ExactlyOnce,
}
use crate::secret;
use crate::slice::{Ladder, LadderError};
use crate::time::Zone;

/// Scheduled message delivery for Apache Kafka.
///
/// Produce a record to the ingest topic (SCHEDULED_MESSAGES) with headers `time` (when) and `topic`
/// (where); it is kept in Kafka, in time-slice topics, and republished to `topic` at `time` with its
/// key, value and headers.
#[derive(Debug, Clone, Parser)]
#[command(name = "scheduler", version)]
pub struct Config {
    /// Kafka bootstrap servers.
    #[arg(long, env = "SM_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,

    /// Address of the HTTP API (/api/jq, /api/wq, /api/job_log, /api/config, /healthz, /metrics).
    #[arg(long, env = "SM_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,

    /// Zone for `time` values written without one: an IANA name or UTC, GMT, CET, MET, EET, WET.
    #[arg(long, env = "SM_DEFAULT_TZ", default_value = "UTC")]
    pub default_tz: Zone,

    /// Consumer group shared by every scheduler process of one deployment.
    #[arg(long, env = "SM_GROUP_ID", default_value = "message-scheduler")]
    pub group_id: String,

    /// A stable id for this process in the group (Kafka static membership, `group.instance.id`).
    /// A process restarted with the same id gets its partitions back at once instead of after the
    /// session timeout: set it per replica (e.g. the pod name). `{hostname}` is replaced by the
    /// host's name, so one setting gives every container of a scaled service its own id. Two
    /// live processes with one id fence each other: the later one stops with an error.
    #[arg(long, env = "SM_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// How long the group waits for a silent process (a SIGKILL, a lost host) before its
    /// partitions move to the others: the worst lateness of a takeover is about this plus a
    /// second. Raised to the broker's `group.min.session.timeout.ms` (Kafka's default is 6 s)
    /// when that is higher: lower that to allow shorter. Heartbeats go every third of it from
    /// librdkafka's own thread, so a busy engine does not miss them.
    #[arg(long, env = "SM_SESSION_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub session_timeout: Duration,

    /// Topic users produce scheduled records to.
    #[arg(long, env = "SM_INGEST_TOPIC", default_value = "SCHEDULED_MESSAGES")]
    pub ingest_topic: String,

    /// Dead-letter topic [default: <ingest topic>.DLQ].
    #[arg(long, env = "SM_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,

    /// Prefix of the time-slice topics; the slice width and slot number follow it.
    #[arg(long, env = "SM_SLICE_PREFIX", default_value = "__SM_SLICE")]
    pub slice_prefix: String,

    /// Width of level 0, which is never written: level 1, `ratio` times wider, holds the records
    /// due soonest, and what falls within a level-1 window whose sweep has begun waits in memory.
    /// 250 ms (1 s level-1 windows, swept 0.5 s ahead) makes the timer hold about 1.5 s of
    /// records it alone can take (beside those within the hold horizon that it holds by choice,
    /// while the budget has room); 1 s (4 s windows, swept 2 s ahead) made that 6 s, more than
    /// the memory budget holds at 20,000 records/s (see BENCHMARKS.md, 2026-12-06).
    #[arg(long, env = "SM_SMALLEST_SLICE", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub smallest_slice: Duration,

    /// Each level's slices are this many times wider than the level below.
    #[arg(long, env = "SM_SLICE_RATIO", default_value_t = 4)]
    pub slice_ratio: i64,

    /// Upper bound on the widest slice; the widest level also holds everything beyond it.
    #[arg(long, env = "SM_LARGEST_SLICE", default_value = "1day", value_parser = humantime::parse_duration)]
    pub largest_slice: Duration,

    /// How many finer widths before its window begins each window is swept (1 to ratio-1): more
    /// gives sweeps more time on a slow broker, at one more slot topic per level per step
    /// [default: 2, or ratio-1 when the ratio is 2].
    #[arg(long, env = "SM_SWEEP_LEAD")]
    pub sweep_lead: Option<i64>,

    /// Time a record must have before its slice is swept, covering produce latency and clock skew
    /// between instances. Must be below smallest-slice.
    #[arg(long, env = "SM_SAFETY_MARGIN", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub safety_margin: Duration,

    /// Records due within this much of now wait in memory from the moment they are read from the
    /// ingest topic, and go to their target in one hop; the ingest offset is committed once they
    /// are delivered, if the memory budget has room for them (at most half of what it gives to
    /// held records: the rest is for records only the timer can take); else, and further out,
    /// they go down the slice ladder. `0s` sends everything the ladder can place into the
    /// slices. The default of 6 s is what the 4 s level-1 windows of earlier versions made the
    /// timer hold: with 1 s windows, records a few seconds ahead still take one hop while the
    /// budget has room (one run each, 2,000/s ordinary client: p99 65 ms held, 375 ms swept).
    #[arg(long, env = "SM_HOLD_HORIZON", default_value = "6s", value_parser = humantime::parse_duration)]
    pub hold_horizon: Duration,

    /// Bytes of records this process holds at once: those waiting in the timer and those sent
    /// and not yet acknowledged. When it is full, reading stops until deliveries make room (e.g.
    /// 32MiB, 512KiB, 1GiB). The default keeps the whole process under 100 MiB resident through
    /// a 200,000-record past-due backlog and a 100,000 x 10 KiB burst (BENCHMARKS.md, 4b), and
    /// still admits thousands of sends in flight: more than the broker takes in a second here.
    #[arg(long, env = "SM_MEMORY_BUDGET", default_value = "32MiB", value_parser = parse_bytes)]
    pub memory_budget: u64,

    /// A cancel or reschedule made durable at least this long before the record's due time is
    /// honoured, whichever process delivers it: a record with an id is published only once this
    /// process's index of ids is known to hold every fact written up to this long before its
    /// due time (otherwise it waits: late, never wrong). Longer lets the index lag more before a
    /// delivery waits; shorter lets a cancel come closer to the due time. A cancel produced to
    /// the ingest topic counts from Kafka's acknowledgement: the gate also waits until every
    /// ingest partition's owner has read up to then (its watermark).
    #[arg(long, env = "SM_CANCEL_LEAD", default_value = "1s", value_parser = humantime::parse_duration)]
    pub cancel_lead: Duration,

    /// Directory of this process's index of ids (a cache of the state topic, rebuilt from Kafka
    /// when missing) [default: $XDG_STATE_HOME/messagescheduler/<group id>-<HTTP port>, or under
    /// ~/.local/state, so that a restart finds it again and two processes on one machine, which
    /// differ in their HTTP port, each have their own].
    #[arg(long, env = "SM_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,

    /// Sweep workers in this process.
    #[arg(long, env = "SM_WORKERS", default_value_t = 4)]
    pub workers: usize,

    /// Readers of each sweep worker: a sweep deals its slot's partitions among them and reads
    /// them at once. A reader waits for each fetch's answer before it asks again; several readers
    /// keep several fetches in flight.
    #[arg(long, env = "SM_SWEEP_READERS", default_value_t = 2)]
    pub sweep_readers: usize,

    /// Partitions of the ingest topic when this process creates it.
    #[arg(long, env = "SM_INGEST_PARTITIONS", default_value_t = 16)]
    pub ingest_partitions: i32,

    /// Partitions of each slice topic when this process creates it.
    #[arg(long, env = "SM_SLICE_PARTITIONS", default_value_t = 4)]
    pub slice_partitions: i32,

    /// Replication factor of the topics this process creates.
    #[arg(long, env = "SM_REPLICATION_FACTOR", default_value_t = 1)]
    pub replication_factor: i32,

    /// Retention of slice topics: the longest outage the scheduler survives without loss.
    #[arg(long, env = "SM_SLICE_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub slice_retention: Duration,

    /// How often safe offsets are committed; in the exactly-once mode, how often a transaction
    /// commits (its records become visible to read_committed consumers then).
    #[arg(long, env = "SM_COMMIT_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub commit_interval: Duration,

    /// The delivery guarantee. `at-least-once`: a crash, a rebalance or a broker restart may
    /// publish a record twice (deduplicate on `sm-id`). `exactly-once`: every write and the
    /// offsets it consumed commit in one Kafka transaction, so a consumer with
    /// `isolation.level=read_committed` sees each record once; records become visible when
    /// their transaction commits (every --commit-interval).
    #[arg(long, env = "SM_DELIVERY", value_enum, default_value_t = Delivery::AtLeastOnce)]
    pub delivery: Delivery,

    /// The producer's transactional id in the exactly-once mode: unique to this process and
    /// the same across its restarts, so that a restart aborts at once what the crashed process
    /// left open (another process with the same id is fenced). Default: the instance id, or
    /// `<group>-<hostname>-<http port>`.
    #[arg(long, env = "SM_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,

    /// How long a target topic may keep refusing deliveries (or leave them unacknowledged) while
    /// the broker itself answers, before its records go to the DLQ as `target-unavailable`. Its
    /// records wait meanwhile in a lane of their own; it shows on `/healthz` after 5 s. A lane
    /// that holds a quarter of the memory budget gives up sooner, so that one target never holds
    /// the budget every other target needs. While the broker is away nothing is given up.
    #[arg(long, env = "SM_TARGET_GIVE_UP", default_value = "30s", value_parser = humantime::parse_duration)]
    pub target_give_up: Duration,

    /// The longest a clean stop (SIGTERM, Ctrl-C) takes: the timer publishes what it holds and
    /// in-flight sends finish within it; what does not stays uncommitted and is sent again by
    /// the next owner. `messagescheduler.sh` waits this long plus 10 s before SIGKILL.
    #[arg(long, env = "SM_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Any librdkafka property for every client, as key=value (repeat the flag; in the environment
    /// separate pairs with ';'). For TLS and SASL: security.protocol, ssl.ca.location,
    /// sasl.mechanism, sasl.username, sasl.password...
    #[arg(short = 'X', long = "kafka-property", env = "SM_KAFKA_PROPERTIES", value_delimiter = ';', value_parser = PropertyParser, hide_env_values = true)]
    pub kafka_properties: Vec<Property>,
}

/// A librdkafka pass-through property, `key=value` (every binary's `-X`). `Display` and `Debug`
/// show the value of a secret key (see [`secret::is_secret_key`]) as [`secret::MASK`].
#[derive(Clone, PartialEq, Eq)]
pub struct Property {
    pub key: String,
    pub value: String,
}

impl Property {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Property {
        Property {
            key: key.into(),
            value: value.into(),
        }
    }

    /// The value as logs, errors and `/api/config` may show it.
    pub fn shown_value(&self) -> &str {
        if secret::is_secret_key(&self.key) {
            secret::MASK
        } else {
            &self.value
        }
    }

    /// Parses `key=value` and asks librdkafka whether it takes it, so that an unknown property
    /// or a bad value stops the start with the key named. The error never holds the entry's
    /// text where it may hold a secret: an entry without '=' is not shown at all, and the value
    /// of a secret key is masked in librdkafka's reason (which can quote it).
    pub fn parse(s: &str) -> Result<Property, String> {
        let Some((key, value)) = s.split_once('=') else {
            return Err(
                "a Kafka property is not key=value (the entry is not shown: it may hold a secret)"
                    .into(),
            );
        };
        let property = Property::new(key.trim(), value);
        if property.key.is_empty() {
            return Err("a Kafka property has an empty key".into());
        }
        let mut check = rdkafka::ClientConfig::new();
        check.set(&property.key, &property.value);
        if let Err(e) = check.create_native_config() {
            let reason = match e {
                rdkafka::error::KafkaError::ClientConfig(_, reason, _, _) => reason,
                other => other.to_string(),
            };
            let reason = if secret::is_secret_key(&property.key) && !property.value.is_empty() {
                reason.replace(&property.value, secret::MASK)
            } else {
                reason
            };
            return Err(format!("Kafka property {}: {reason}", property.key));
        }
        Ok(property)
    }
}

impl std::fmt::Display for Property {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.shown_value())
    }
}

impl std::fmt::Debug for Property {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

/// The `-X` parser for clap: [`Property::parse`], with an error that does not quote the entry
/// (clap's own "invalid value '...'" would print a password given without '=').
#[derive(Clone, Copy, Debug)]
pub struct PropertyParser;

impl clap::builder::TypedValueParser for PropertyParser {
    type Value = Property;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Property, clap::Error> {
        let arg = arg.map_or_else(|| "-X".to_string(), |a| a.to_string());
        let parsed = value
            .to_str()
            .ok_or_else(|| "a Kafka property is not UTF-8".to_string())
            .and_then(Property::parse);
        parsed.map_err(|reason| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{arg}': {reason}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

/// Parses a size: a number of bytes with an optional `KiB`, `MiB` or `GiB` suffix.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 64MiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(scale)
        .filter(|&b| b >= 1 << 20)
        .ok_or_else(|| format!("{s:?} must be between 1MiB and 16EiB"))
}

/// A configuration error that stops the start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("slice ladder: {0}")]
    Ladder(#[from] LadderError),
    #[error("{0} must be at least 1")]
    NotPositive(&'static str),
    #[error("{0} is too long (at most {1})")]
    TooLong(&'static str, String),
    #[error("{0} is too short (at least {1})")]
    TooShort(&'static str, String),
    #[error("slice retention {retention} is shorter than the longest a record can wait in one slice topic ({wait}: a turn of the top level's ring) plus an hour; records would be deleted before their sweep. Raise --slice-retention")]
    RetentionTooShort { retention: String, wait: String },
    #[error("hold-horizon {0} is over {MAX_HOLD}: records held that long keep their ingest offsets uncommitted for as long, and a restart reads all of it again; let the slices hold them")]
    HoldTooLong(String),
}

/// The longest `--hold-horizon`: one hour.
const MAX_HOLD: &str = "1h";

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub ladder: Ladder,
    pub internal: InternalTopics,
    /// Records due within this many milliseconds go from ingest straight to the timer.
    pub hold_ms: i64,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Settings {
    pub fn new(config: Config) -> Result<Settings, ConfigError> {
        let ladder = Ladder::new(
            millis(config.smallest_slice),
            config.slice_ratio,
            millis(config.largest_slice),
            millis(config.safety_margin),
        )?
        .with_lead_factor(config.sweep_lead.unwrap_or(2.min(config.slice_ratio - 1)))?;
        for (name, value) in [
            ("workers", config.workers as i64),
            ("sweep-readers", config.sweep_readers as i64),
            ("ingest-partitions", config.ingest_partitions as i64),
            ("slice-partitions", config.slice_partitions as i64),
            ("replication-factor", config.replication_factor as i64),
        ] {
            if value < 1 {
                return Err(ConfigError::NotPositive(name));
            }
        }
        if config.commit_interval.is_zero() {
            return Err(ConfigError::NotPositive("commit-interval"));
        }
        // Heartbeats go every third of it, at most every second; below a second they would
        // crowd the coordinator and a short stall of the network would evict a live process.
        if config.session_timeout < Duration::from_secs(1) {
            return Err(ConfigError::TooShort("session-timeout", "1s".into()));
        }
        let internal = InternalTopics {
            dlq: config
                .dlq_topic
                .clone()
                .unwrap_or_else(|| format!("{}.DLQ", config.ingest_topic)),
            ingest: config.ingest_topic.clone(),
            state: format!("{}.STATE", config.ingest_topic),
            slice_prefix: config.slice_prefix.clone(),
        };
        if config.slice_prefix.len() > 200 {
            return Err(ConfigError::TooLong(
                "slice-prefix",
                "200 characters".into(),
            ));
        }
        // A record waits in one slice topic at most a turn of the top level's ring (a record
        // beyond the horizon is read and written again once per turn); retention must outlast it.
        let top = ladder.levels() - 1;
        let longest_wait = ladder.width(top).saturating_mul(ladder.slots());
        let needed = longest_wait.saturating_add(3_600_000);
        if millis(config.slice_retention) < needed {
            let fmt =
                |ms: i64| humantime::format_duration(Duration::from_millis(ms as u64)).to_string();
            return Err(ConfigError::RetentionTooShort {
                retention: fmt(millis(config.slice_retention)),
                wait: fmt(longest_wait),
            });
        }
        let mut config = config;
        if let Some(id) = &config.instance_id {
            config.instance_id = Some(id.replace("{hostname}", &hostname()));
        }
        let hold_ms = millis(config.hold_horizon);
        if hold_ms > 3_600_000 {
            return Err(ConfigError::HoldTooLong(
                humantime::format_duration(Duration::from_millis(hold_ms as u64)).to_string(),
            ));
        }
        Ok(Settings {
            config,
            ladder,
            internal,
            hold_ms,
        })
    }

    /// The directory of the index of ids for a process whose HTTP API listens on `http_port`.
    pub fn state_dir(&self, http_port: u16) -> std::path::PathBuf {
        if let Some(dir) = &self.config.state_dir {
            return dir.clone();
        }
        let base = std::env::var_os("XDG_STATE_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".local/state"))
            })
            .unwrap_or_else(std::env::temp_dir);
        base.join("messagescheduler")
            .join(format!("{}-{http_port}", self.config.group_id))
    }

    pub fn cancel_lead_ms(&self) -> i64 {
        millis(self.config.cancel_lead)
    }

    /// Retention of the slice (and ingest) topics, in milliseconds.
    pub fn retention_ms(&self) -> i64 {
        millis(self.config.slice_retention)
    }

    /// The slice topic for a level's slot.
    pub fn slice_topic(&self, level: usize, slot: i64) -> String {
        self.ladder.topic(&self.config.slice_prefix, level, slot)
    }

    /// The transactional id of the exactly-once mode (see [`Config::transactional_id`]).
    pub fn transactional_id(&self, http_port: u16) -> String {
        let c = &self.config;
        c.transactional_id
            .clone()
            .or_else(|| c.instance_id.clone())
            .unwrap_or_else(|| format!("{}-{}-{http_port}", c.group_id, hostname()))
    }

    pub fn exactly_once(&self) -> bool {
        self.config.delivery == Delivery::ExactlyOnce
    }

    /// What `GET /api/config` shows: everything but secrets.
    pub fn view(&self) -> ConfigView {
        let c = &self.config;
        ConfigView {
            bootstrap_servers: c.bootstrap_servers.clone(),
            http_addr: c.http_addr.to_string(),
            default_tz: c.default_tz.to_string(),
            group_id: c.group_id.clone(),
            instance_id: c.instance_id.clone(),
            session_timeout_ms: millis(c.session_timeout),
            ingest_topic: self.internal.ingest.clone(),
            dlq_topic: self.internal.dlq.clone(),
            state_topic: self.internal.state.clone(),
            cancel_lead_ms: millis(c.cancel_lead),
            slice_widths_ms: self.ladder.widths().to_vec(),
            slice_ratio: self.ladder.ratio(),
            slots_per_level: self.ladder.slots(),
            sweep_lead: self.ladder.lead_factor(),
            safety_margin_ms: self.ladder.margin_ms(),
            hold_horizon_ms: self.hold_ms,
            memory_budget_bytes: c.memory_budget,
            workers: c.workers,
            sweep_readers: c.sweep_readers,
            ingest_partitions: c.ingest_partitions,
            slice_partitions: c.slice_partitions,
            replication_factor: c.replication_factor,
            slice_retention_ms: millis(c.slice_retention),
            commit_interval_ms: millis(c.commit_interval),
            delivery: c.delivery,
            transactional_id: c.transactional_id.clone(),
            shutdown_timeout_ms: millis(c.shutdown_timeout),
            target_give_up_ms: millis(c.target_give_up),
            kafka_properties: c
                .kafka_properties
                .iter()
                .map(|p| (p.key.clone(), p.shown_value().to_string()))
                .collect(),
        }
    }
}

/// This host's name (a container's is its id), for `{hostname}` in the instance id.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| "unknown-host".into())
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigView {
    pub bootstrap_servers: String,
    pub http_addr: String,
    pub default_tz: String,
    pub group_id: String,
    pub instance_id: Option<String>,
    /// In use: `--session-timeout`, or the broker's `group.min.session.timeout.ms` if higher.
    pub session_timeout_ms: i64,
    pub ingest_topic: String,
    pub dlq_topic: String,
    pub state_topic: String,
    pub cancel_lead_ms: i64,
    pub slice_widths_ms: Vec<i64>,
    pub slice_ratio: i64,
    pub slots_per_level: i64,
    pub sweep_lead: i64,
    pub safety_margin_ms: i64,
    pub hold_horizon_ms: i64,
    pub memory_budget_bytes: u64,
    pub workers: usize,
    pub sweep_readers: usize,
    pub ingest_partitions: i32,
    pub slice_partitions: i32,
    pub replication_factor: i32,
    pub slice_retention_ms: i64,
    pub commit_interval_ms: i64,
    pub delivery: Delivery,
    pub transactional_id: Option<String>,
    pub shutdown_timeout_ms: i64,
    pub target_give_up_ms: i64,
    pub kafka_properties: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let mut argv = vec!["scheduler"];
        argv.extend_from_slice(args);
        let config = Config::try_parse_from(argv).map_err(|e| e.to_string())?;
        Settings::new(config).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.internal.dlq, "SCHEDULED_MESSAGES.DLQ");
        assert_eq!(s.ladder.width(1), 1000, "level-1 windows of 1 s");
        assert_eq!(s.ladder.lead(1), 500, "swept half a second ahead");
        assert_eq!(
            s.slice_topic(2, 3),
            "__SM_SLICE_4000MS_3",
            "4 s windows keep the topics a 1 s ladder wrote (the width is in the name)"
        );
    }

    #[test]
    fn bad_values_stop_the_start() {
        assert!(parse(&["--default-tz", "PST"]).unwrap_err().contains("PST"));
        assert!(parse(&["--slice-ratio", "1"])
            .unwrap_err()
            .contains("ratio"));
        assert!(parse(&["--workers", "0"]).unwrap_err().contains("workers"));
        assert!(parse(&["-X", "novalue"]).unwrap_err().contains("key=value"));
        assert!(parse(&["--safety-margin", "5s"])
            .unwrap_err()
            .contains("margin"));
        assert!(parse(&["--memory-budget", "64MB"])
            .unwrap_err()
            .contains("unit"));
        assert!(parse(&["--memory-budget", "100"])
            .unwrap_err()
            .contains("1MiB"));
    }

    #[test]
    fn a_retention_shorter_than_the_longest_wait_is_refused() {
        // Defaults: 7 slots x 65,536 s (about 5.3 days) + 1 h, within 7 days.
        assert!(parse(&[]).is_ok());
        let err = parse(&["--slice-retention", "5days"]).unwrap_err();
        assert!(
            err.contains("slice retention") && err.contains("Raise"),
            "{err}"
        );
        assert!(parse(&["--largest-slice", "1h", "--slice-retention", "9h"]).is_ok());
    }

    #[test]
    fn the_instance_id_can_name_the_host() {
        let s = parse(&["--instance-id", "scheduler-{hostname}"]).unwrap();
        let id = s.config.instance_id.unwrap();
        assert!(id.starts_with("scheduler-") && !id.contains('{'), "{id}");
        assert_eq!(id, format!("scheduler-{}", hostname()));
    }

    #[test]
    fn sizes_and_the_hold_horizon() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("2048KiB"), Ok(2 << 20));
        assert_eq!(parse(&[]).unwrap().hold_ms, 6000, "6 s by default");
        assert_eq!(parse(&["--hold-horizon", "0s"]).unwrap().hold_ms, 0);
        assert_eq!(parse(&["--hold-horizon", "1h"]).unwrap().hold_ms, 3_600_000);
        let too_long = parse(&["--hold-horizon", "61m"]).unwrap_err();
        assert!(too_long.contains("over 1h"), "{too_long}");
    }

    #[test]
    fn secrets_are_redacted() {
        let s = parse(&[
            "-X",
            "sasl.password=hunter2",
            "-X",
            "ssl.key.password=hunter3",
            "-X",
            "ssl.keystore.password=hunter4",
            "-X",
            "sasl.oauthbearer.config=hunter5",
            "-X",
            "security.protocol=SASL_SSL",
            "-X",
            // A value that merely looks like a secret is shown: redaction goes by key.
            "client.id=password-reset-service",
        ])
        .unwrap();
        let view = serde_json::to_string(&s.view()).unwrap();
        let debug = format!("{s:?}");
        for secret in ["hunter2", "hunter3", "hunter4", "hunter5"] {
            assert!(!view.contains(secret), "{secret} shown: {view}");
            assert!(!debug.contains(secret), "{secret} in Debug: {debug}");
        }
        for shown in [&view, &debug] {
            assert!(shown.contains("SASL_SSL") && shown.contains("password-reset-service"));
            assert!(shown.contains("sasl.password") && shown.contains("***"));
        }
    }

    #[test]
    fn a_property_librdkafka_refuses_stops_the_start_without_its_secret() {
        // librdkafka knows no JAAS (a Java client's setting), and rdkafka's own error would
        // quote the value.
        let err = parse(&[
            "-X",
            r#"sasl.jaas.config=PlainLoginModule password="hunter6";"#,
        ])
        .unwrap_err();
        assert!(err.contains("sasl.jaas.config"), "{err}");
        assert!(!err.contains("hunter6"), "{err}");
        // A non-secret value is quoted, to say what is wrong with it.
        let err = parse(&["-X", "security.protocol=SASL_SSH"]).unwrap_err();
        assert!(
            err.contains("security.protocol") && err.contains("SASL_SSH"),
            "{err}"
        );
        // An entry without '=' may be a secret typed wrongly: not quoted at all.
        let err = parse(&["-X", "sasl.password:hunter7"]).unwrap_err();
        assert!(
            err.contains("key=value") && !err.contains("hunter7"),
            "{err}"
        );
    }
}
