//! Secrets given by environment never show: not in `--help`, not in the error of a start that
//! fails, not in any log line (at debug level). A planted password is looked for in all the
//! binary writes.

use std::time::Duration;

use scheduler::testkit::{
    assert_no_planted_password as assert_hidden, free_port, run_binary, PLANTED_PASSWORD as PLANTED,
};

fn run(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut env = env.to_vec();
    env.extend([
        ("RUST_LOG", "debug"),
        ("SM_BOOTSTRAP_SERVERS", "127.0.0.1:1"),
        ("SM_MYSQL_URL", "mysql://u:PlantedPassw0rd@127.0.0.1:1/db"),
        ("SM_SCHEDULER_URL", "http://u:PlantedPassw0rd@127.0.0.1:1"),
    ]);
    run_binary(
        env!("CARGO_BIN_EXE_messenger"),
        args,
        &env,
        Duration::from_secs(20),
    )
}

#[test]
fn help_hides_the_urls() {
    let uri = format!("mongodb://u:{PLANTED}@127.0.0.1:1");
    let sasl = format!("sasl.password={PLANTED}");
    let (status, output) = run(
        &["--help"],
        &[("SM_MONGODB_URI", &uri), ("SM_KAFKA_PROPERTIES", &sasl)],
    );
    assert!(status.success(), "{output}");
    for name in [
        "SM_MONGODB_URI",
        "SM_MYSQL_URL",
        "SM_SCHEDULER_URL",
        "SM_KAFKA_PROPERTIES",
    ] {
        assert!(output.contains(&format!("[env: {name}]")), "{output}");
    }
    assert_hidden(&output);
}

/// No MongoDB on the port (the URI's own option keeps the wait short): the error names MongoDB
/// and its address, not the password.
#[test]
fn an_unreachable_audit_store_is_named_without_the_password() {
    let port = free_port();
    let uri = format!("mongodb://u:{PLANTED}@127.0.0.1:{port}/?serverSelectionTimeoutMS=300");
    let (status, output) = run(&["report"], &[("SM_MONGODB_URI", &uri)]);
    assert!(!status.success(), "{output}");
    assert!(
        output.contains(&format!(
            "cannot reach MongoDB at mongodb://u:***@127.0.0.1:{port}/"
        )),
        "{output}"
    );
    assert_hidden(&output);
}

/// The messenger takes librdkafka properties as the scheduler and the baseline do (TLS, SASL for
/// an existing cluster): asked for SASL by a broker that speaks plain Kafka, its start fails,
/// naming Kafka, and the SASL password shows nowhere. (Without `SM_KAFKA_PROPERTIES` it ignored
/// them and started.)
#[test]
fn kafka_properties_reach_the_messengers_clients_and_their_password_never_shows() {
    let bootstrap = std::env::var("SM_BOOTSTRAP_SERVERS").expect("the test run's broker");
    let properties = format!(
        "security.protocol=SASL_PLAINTEXT;sasl.mechanisms=PLAIN;sasl.username=u;sasl.password={PLANTED}"
    );
    let (status, output) = run_binary(
        env!("CARGO_BIN_EXE_messenger"),
        &["serve"],
        &[
            ("RUST_LOG", "debug"),
            ("SM_BOOTSTRAP_SERVERS", &bootstrap),
            ("SM_KAFKA_PROPERTIES", &properties),
            (
                "SM_MESSENGER_HTTP_ADDR",
                &format!("127.0.0.1:{}", free_port()),
            ),
        ],
        Duration::from_secs(30),
    );
    assert!(!status.success(), "{output}");
    assert!(output.contains("Kafka at"), "{output}");
    assert_hidden(&output);
}
