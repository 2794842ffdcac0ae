//! Test helpers (feature `testkit`): a fresh database per test on the server of `SM_MYSQL_URL`
//! (`./messagescheduler.sh --test` sets it to the project's own account and database).

use sqlx::Connection;

/// Creates a database with a unique name and returns its URL. The name starts with the name of
/// `SM_MYSQL_URL`'s database, which the project's account is granted as a prefix. Panics when
/// MySQL cannot be reached: this is test set-up.
pub async fn fresh_database() -> String {
    let base = std::env::var("SM_MYSQL_URL")
        .expect("SM_MYSQL_URL names the test server (./messagescheduler.sh --test sets it)");
    let (server, database) = base.rsplit_once('/').expect("a URL with a database");
    let name = format!(
        "{database}_{}",
        scheduler::testkit::unique("t").replace('-', "_")
    );
    let mut conn = sqlx::MySqlConnection::connect(&base)
        .await
        .expect("mysql answers");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create database");
    format!("{server}/{name}")
}

/// The flags of a test db-scheduler: the given table and poll interval, the test broker, an HTTP
/// port the OS picks.
pub fn args(mysql_url: &str, interval: &str, batch: i64) -> Vec<String> {
    [
        "--mysql-url",
        mysql_url,
        "--bootstrap-servers",
        &scheduler::testkit::bootstrap(),
        "--http-addr",
        "127.0.0.1:0",
        "--poll-interval",
        interval,
        "--batch-size",
        &batch.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// [`args`] parsed into a configuration.
pub fn config(mysql_url: &str, interval: &str, batch: i64) -> crate::Config {
    let argv = std::iter::once("db-scheduler".to_string()).chain(args(mysql_url, interval, batch));
    <crate::Config as clap::Parser>::parse_from(argv)
}
