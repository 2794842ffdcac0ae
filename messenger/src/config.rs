//! Configuration: where the servers are, and the experiment (what the original's `experiment.env`
//! held). Every field is a flag and an environment variable; `POST /produce-messages` overrides
//! the experiment's fields per run.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use scheduler::config::{Property, PropertyParser};
use scheduler::secret::SecretUrl;
use serde::{Deserialize, Serialize};

/// Servers and topics.
#[derive(Debug, Clone, Args)]
pub struct Connections {
    /// Kafka bootstrap servers.
    #[arg(long, env = "SM_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,
    /// Any librdkafka property for every Kafka client of the messenger, as key=value (TLS, SASL;
    /// repeatable; ';'-separated in the environment), as the scheduler and the baseline take it.
    #[arg(short = 'X', long = "kafka-property", env = "SM_KAFKA_PROPERTIES", value_delimiter = ';', value_parser = PropertyParser, hide_env_values = true)]
    pub kafka_properties: Vec<Property>,
    /// MongoDB URI of the audit store.
    #[arg(
        long,
        env = "SM_MONGODB_URI",
        default_value = "mongodb://127.0.0.1:27017",
        hide_env_values = true
    )]
    pub mongodb_uri: SecretUrl,
    /// Audit database.
    #[arg(long, env = "SM_MONGODB_DATABASE", default_value = "messagescheduler")]
    pub mongodb_database: String,
    /// MySQL URL of the db-scheduler baseline's table.
    #[arg(
        long,
        env = "SM_MYSQL_URL",
        default_value = "mysql://messagescheduler@127.0.0.1:3306/messagescheduler",
        hide_env_values = true
    )]
    pub mysql_url: SecretUrl,
    /// The scheduler's ingest topic.
    #[arg(long, env = "SM_INGEST_TOPIC", default_value = "SCHEDULED_MESSAGES")]
    pub ingest_topic: String,
    /// Where scheduled SMS are delivered, and the senders read.
    #[arg(long, env = "SM_SMS_TOPIC", default_value = "sms-messages")]
    pub sms_topic: String,
    /// Where senders report their totals.
    #[arg(long, env = "SM_STATUS_TOPIC", default_value = "sender-status-updates")]
    pub status_topic: String,
    /// Consumer group of the senders.
    #[arg(long, env = "SM_SENDERS_GROUP", default_value = "sms-senders")]
    pub senders_group: String,
    /// Number of senders (and partitions of the SMS topic when it is created).
    #[arg(long, env = "SM_EXP_SENDERS", default_value_t = 4)]
    pub senders: usize,
    /// Chance that a sender's simulated SMS send succeeds.
    #[arg(long, env = "SM_EXP_SUCCESS_RATE", default_value_t = 0.95)]
    pub success_rate: f64,
    /// Simulated time a sender spends on one SMS (sends run concurrently; arrival is timed first).
    #[arg(long, env = "SM_EXP_PROCESSING_TIME", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub processing_time: Duration,
    /// HTTP address of `messenger serve`.
    /// The Kafka scheduler's HTTP API, for the workload's cancels over HTTP.
    #[arg(
        long,
        env = "SM_SCHEDULER_URL",
        default_value = "http://127.0.0.1:8000",
        hide_env_values = true
    )]
    pub scheduler_url: SecretUrl,

    #[arg(long, env = "SM_MESSENGER_HTTP_ADDR", default_value = "127.0.0.1:5000")]
    pub http_addr: SocketAddr,
}

/// One experiment. Defaults: 10,000 messages over 1 hour, delays of 1 s to 1 h, both paths.
#[derive(Debug, Clone, Args, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Experiment {
    /// Messages to schedule.
    #[arg(long, env = "SM_EXP_COUNT", default_value_t = 10_000)]
    pub count: u64,
    /// Time over which they are produced (ignored when a rate is given).
    #[arg(long, env = "SM_EXP_DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub duration: Duration,
    /// Messages produced per second [default: count / duration].
    #[arg(long, env = "SM_EXP_RATE")]
    pub rate: Option<f64>,
    /// Characters of each SMS body.
    #[arg(long, env = "SM_EXP_VALUE_SIZE", default_value_t = 10)]
    pub value_size: usize,
    /// Shortest delay between producing a message and its due time.
    #[arg(long, env = "SM_EXP_MIN_DELAY", default_value = "1s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub min_delay: Duration,
    /// Longest delay.
    #[arg(long, env = "SM_EXP_MAX_DELAY", default_value = "1h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub max_delay: Duration,
    /// Send through the Kafka scheduler.
    #[arg(long, env = "SM_EXP_KAFKA", default_value_t = true, action = clap::ArgAction::Set)]
    pub kafka: bool,
    /// Also hand every message to the MySQL baseline.
    #[arg(long, env = "SM_EXP_MYSQL", default_value_t = true, action = clap::ArgAction::Set)]
    pub mysql: bool,
    /// Share of the messages cancelled after they are scheduled (half over Kafka, half over the
    /// scheduler's HTTP API; a row update in MySQL). Only messages due at least
    /// `CHANGE_LEAD` after the change are changed: the window the scheduler guarantees.
    #[arg(long, env = "SM_EXP_CANCEL_SHARE", default_value_t = 0.1)]
    pub cancel_share: f64,
    /// Share of the messages rescheduled to a new time and a new value (over Kafka; a row
    /// update in MySQL), under the same rule.
    #[arg(long, env = "SM_EXP_RESCHEDULE_SHARE", default_value_t = 0.1)]
    pub reschedule_share: f64,
    /// How long after the last due time a message that has not arrived counts as missing.
    #[arg(long, env = "SM_EXP_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub grace: Duration,
}

impl Default for Experiment {
    fn default() -> Self {
        Experiment {
            count: 10_000,
            duration: Duration::from_secs(3600),
            rate: None,
            value_size: 10,
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(3600),
            kafka: true,
            mysql: true,
            grace: Duration::from_secs(30),
            cancel_share: 0.1,
            reschedule_share: 0.1,
        }
    }
}

/// Why an experiment cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExperimentError {
    #[error("count must be at least 1")]
    NoMessages,
    #[error("the rate must be a positive number of messages per second")]
    BadRate,
    #[error("min-delay must not exceed max-delay")]
    DelayRange,
    #[error("at least one path (kafka or mysql) must be on")]
    NoPath,
    #[error("value-size must be at most 1,000,000")]
    TooLarge,
    #[error("cancel-share and reschedule-share must be between 0 and 1, and add up to at most 1")]
    BadShare,
}

impl Experiment {
    pub fn validate(&self) -> Result<(), ExperimentError> {
        if self.count == 0 {
            return Err(ExperimentError::NoMessages);
        }
        if self.rate.is_some_and(|r| !(r.is_finite() && r > 0.0))
            || (self.rate.is_none() && self.duration.is_zero())
        {
            return Err(ExperimentError::BadRate);
        }
        if self.min_delay > self.max_delay {
            return Err(ExperimentError::DelayRange);
        }
        if !self.kafka && !self.mysql {
            return Err(ExperimentError::NoPath);
        }
        if self.value_size > 1_000_000 {
            return Err(ExperimentError::TooLarge);
        }
        let share = |s: f64| (0.0..=1.0).contains(&s);
        if !share(self.cancel_share)
            || !share(self.reschedule_share)
            || self.cancel_share + self.reschedule_share > 1.0
        {
            return Err(ExperimentError::BadShare);
        }
        Ok(())
    }

    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.rate
            .unwrap_or(self.count as f64 / self.duration.as_secs_f64().max(0.001))
    }

    /// The paths this experiment uses.
    pub fn paths(&self) -> Vec<crate::Path> {
        let mut p = Vec::new();
        if self.kafka {
            p.push(crate::Path::Kafka);
        }
        if self.mysql {
            p.push(crate::Path::Mysql);
        }
        p
    }
}

/// Durations as humantime strings ("1h", "250ms") in JSON, as on the command line.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_original_experiment() {
        let e = Experiment::default();
        assert_eq!(e.validate(), Ok(()));
        assert!((e.rate() - 10_000.0 / 3600.0).abs() < 1e-9);
        assert_eq!(e.paths().len(), 2);
    }

    #[test]
    fn http_overrides_parse_and_bad_ones_are_refused() {
        let e: Experiment = serde_json::from_str(
            r#"{"count": 500, "rate": 100, "min_delay": "2s", "max_delay": "10s", "mysql": false}"#,
        )
        .unwrap();
        assert_eq!(
            (e.count, e.rate(), e.min_delay, e.mysql),
            (500, 100.0, Duration::from_secs(2), false)
        );
        assert_eq!(e.validate(), Ok(()));
        let bad: Experiment =
            serde_json::from_str(r#"{"min_delay": "10s", "max_delay": "1s"}"#).unwrap();
        assert_eq!(bad.validate(), Err(ExperimentError::DelayRange));
        let none: Experiment = serde_json::from_str(r#"{"kafka": false, "mysql": false}"#).unwrap();
        assert_eq!(none.validate(), Err(ExperimentError::NoPath));
        assert!(serde_json::from_str::<Experiment>(r#"{"min_delay": "soon"}"#).is_err());
        let greedy: Experiment =
            serde_json::from_str(r#"{"cancel_share": 0.7, "reschedule_share": 0.5}"#).unwrap();
        assert_eq!(greedy.validate(), Err(ExperimentError::BadShare));
    }
}
