//! The errors that stop the scheduler, one enum for the crate (per-record problems are not
//! among them: they go to the DLQ or are retried).

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config;

/// Errors that stop the scheduler. Per-record problems never become one of these: they go to the
/// DLQ or are retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("could not create topic {0}: {1}")]
    CreateTopic(String, RDKafkaErrorCode),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("fatal: {0}")]
    Fatal(String),
    /// The consumer group fenced this process's static member id (see [`crate::kafka::Fatal::Fenced`]).
    #[error("fenced: {0}")]
    Fenced(String),
    /// The exactly-once mode's transaction was aborted (see [`crate::kafka::Fatal::Aborted`]).
    #[error("transaction aborted: {0}")]
    Aborted(String),
    /// A clean stop ran out of time with work left (what, and what stays uncommitted).
    #[error("stopped with work left: {0}")]
    Unfinished(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
