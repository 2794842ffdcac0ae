//! Configuration of the db-scheduler, validated at start-up.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use scheduler::config::{Property, PropertyParser};
use scheduler::secret::SecretUrl;

/// The classic baseline: a MySQL table polled for due rows, each published to its Kafka topic.
#[derive(Debug, Clone, Parser)]
#[command(name = "db-scheduler", version)]
pub struct Config {
    /// MySQL (or MariaDB) connection URL.
    #[arg(
        long,
        env = "SM_MYSQL_URL",
        default_value = "mysql://messagescheduler@127.0.0.1:3306/messagescheduler",
        hide_env_values = true
    )]
    pub mysql_url: SecretUrl,

    /// Kafka bootstrap servers.
    #[arg(long, env = "SM_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,

    /// Address of the HTTP API (/healthz, /metrics, /api/status).
    #[arg(long, env = "SM_DB_HTTP_ADDR", default_value = "127.0.0.1:8001")]
    pub http_addr: SocketAddr,

    /// How often the table is polled for due rows: 10ms to 60s.
    #[arg(long, env = "SM_POLL_INTERVAL", default_value = "1s", value_parser = parse_interval)]
    pub poll_interval: Duration,

    /// Most rows claimed by one poll.
    #[arg(long, env = "SM_DB_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub batch_size: i64,

    /// Any librdkafka property, as key=value (repeatable; ';'-separated in the environment).
    #[arg(short = 'X', long = "kafka-property", env = "SM_KAFKA_PROPERTIES", value_delimiter = ';', value_parser = PropertyParser, hide_env_values = true)]
    pub kafka_properties: Vec<Property>,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(60) {
        return Err(format!("{s} is outside 10ms..=60s"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_bounded() {
        let parse = |a: &[&str]| Config::try_parse_from([&["db-scheduler"], a].concat());
        assert_eq!(parse(&[]).unwrap().poll_interval, Duration::from_secs(1));
        assert_eq!(
            parse(&["--poll-interval", "10ms"]).unwrap().poll_interval,
            Duration::from_millis(10)
        );
        assert!(parse(&["--poll-interval", "5ms"]).is_err());
        assert!(parse(&["--poll-interval", "61s"]).is_err());
        assert!(parse(&["--batch-size", "0"]).is_err());
        assert!(parse(&["-X", "novalue"]).is_err());
        assert_eq!(
            parse(&["-X", "acks=all"]).unwrap().kafka_properties,
            [Property::new("acks", "all")]
        );
    }

    #[test]
    fn debug_shows_no_password() {
        let config = Config::try_parse_from([
            "db-scheduler",
            "--mysql-url",
            "mysql://u:hunter2@db:3306/m",
            "-X",
            "sasl.password=hunter3",
        ])
        .unwrap();
        assert_eq!(config.mysql_url.expose(), "mysql://u:hunter2@db:3306/m");
        let debug = format!("{config:?}");
        assert!(debug.contains("mysql://u:***@db:3306/m"), "{debug}");
        assert!(debug.contains("sasl.password=***"), "{debug}");
        assert!(!debug.contains("hunter"), "{debug}");
    }
}
