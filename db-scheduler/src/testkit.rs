//! Test helpers (feature `testkit`): a fresh database per test on the server of `SM_MYSQL_URL`.

use sqlx::Connection;

/// Creates a database with a unique name and returns its URL. Panics when MySQL cannot be reached:
/// this is test set-up.
pub async fn fresh_database() -> String {
    let base =
        std::env::var("SM_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let name = scheduler::testkit::unique("dbs").replace('-', "_");
    let mut conn = sqlx::MySqlConnection::connect(&base)
        .await
        .expect("mysql answers");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create database");
    let (server, _) = base.rsplit_once('/').expect("a URL with a database");
    format!("{server}/{name}")
}
