//! Secrets given by environment never show: not in `--help`, not in the error of a start that
//! fails, not in any log line (at debug level). A planted password is looked for in all the
//! binary writes.

use std::net::TcpListener;
use std::time::Duration;

use scheduler::testkit::{
    assert_no_planted_password as assert_hidden, run_binary, PLANTED_PASSWORD as PLANTED,
};

fn run(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut env = env.to_vec();
    env.extend([
        ("RUST_LOG", "debug"),
        ("SM_DB_HTTP_ADDR", "127.0.0.1:0"),
        ("SM_BOOTSTRAP_SERVERS", "127.0.0.1:1"),
    ]);
    run_binary(
        env!("CARGO_BIN_EXE_db-scheduler"),
        args,
        &env,
        Duration::from_secs(20),
    )
}

#[test]
fn help_hides_the_url_and_the_kafka_properties() {
    let url = format!("mysql://u:{PLANTED}@127.0.0.1:1/db");
    let properties = format!("sasl.username=u;sasl.password={PLANTED}");
    let (status, output) = run(
        &["--help"],
        &[("SM_MYSQL_URL", &url), ("SM_KAFKA_PROPERTIES", &properties)],
    );
    assert!(status.success(), "{output}");
    assert!(output.contains("[env: SM_MYSQL_URL]"), "{output}");
    assert!(output.contains("[env: SM_KAFKA_PROPERTIES]"), "{output}");
    assert_hidden(&output);
}

/// A MySQL server that hangs up on every connection (sqlx gives up at once, where a closed port
/// makes it retry for 30 s): the error names MySQL and its address, not the password.
#[test]
fn a_database_that_hangs_up_is_named_without_the_password() {
    let server = TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = server.local_addr().expect("an address").port();
    std::thread::spawn(move || {
        for connection in server.incoming() {
            drop(connection);
        }
    });
    let url = format!("mysql://u:{PLANTED}@127.0.0.1:{port}/db");
    let properties = format!("sasl.username=u;sasl.password={PLANTED}");
    let (status, output) = run(
        &[],
        &[("SM_MYSQL_URL", &url), ("SM_KAFKA_PROPERTIES", &properties)],
    );
    assert!(!status.success(), "{output}");
    assert!(
        output.contains(&format!(
            "cannot reach MySQL at mysql://u:***@127.0.0.1:{port}/db"
        )),
        "{output}"
    );
    assert_hidden(&output);
}
