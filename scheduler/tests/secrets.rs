//! Secrets given by environment never show: not in `--help`, not in the error of a start that
//! fails, not in any log line (at debug level). A planted password is looked for in all the
//! binary writes.

use std::time::Duration;

use scheduler::testkit::{
    assert_no_planted_password as assert_hidden, run_binary, unique, PLANTED_PASSWORD as PLANTED,
};

fn run(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let state = std::env::temp_dir().join(unique("sm-secrets-state"));
    let state = state.to_string_lossy();
    let mut env = env.to_vec();
    env.extend([
        ("RUST_LOG", "debug"),
        ("SM_HTTP_ADDR", "127.0.0.1:0"),
        ("SM_BOOTSTRAP_SERVERS", "127.0.0.1:1"),
        ("SM_STATE_DIR", &*state),
    ]);
    let ran = run_binary(
        env!("CARGO_BIN_EXE_scheduler"),
        args,
        &env,
        Duration::from_secs(20),
    );
    let _ = std::fs::remove_dir_all(&*state);
    ran
}

#[test]
fn help_hides_the_kafka_properties() {
    let properties = format!("security.protocol=SASL_SSL;sasl.username=u;sasl.password={PLANTED}");
    let (status, output) = run(&["--help"], &[("SM_KAFKA_PROPERTIES", &properties)]);
    assert!(status.success(), "{output}");
    assert!(output.contains("[env: SM_KAFKA_PROPERTIES]"), "{output}");
    assert_hidden(&output);
}

/// librdkafka's client refuses to start (SASL PLAIN without a user name): the error says so, and
/// the password in the same configuration does not show.
#[test]
fn a_client_that_cannot_start_does_not_show_the_password() {
    let properties =
        format!("security.protocol=SASL_PLAINTEXT;sasl.mechanism=PLAIN;sasl.password={PLANTED}");
    let (status, output) = run(&[], &[("SM_KAFKA_PROPERTIES", &properties)]);
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("kafka") && output.contains("sasl.username"),
        "{output}"
    );
    assert_hidden(&output);
}

/// A property librdkafka does not take (rdkafka's own error would quote its value), and an
/// entry that is not key=value (clap's own error would quote it): the start stops, naming the
/// property where there is one, quoting neither.
#[test]
fn a_refused_property_is_named_without_its_value() {
    let jaas = format!(r#"sasl.username=u;sasl.jaas.config=PlainLoginModule password="{PLANTED}""#);
    let (status, output) = run(&[], &[("SM_KAFKA_PROPERTIES", &jaas)]);
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(
        output.contains("--kafka-property") && output.contains("sasl.jaas.config"),
        "{output}"
    );
    assert_hidden(&output);

    let typo = format!("sasl.password {PLANTED}");
    let (status, output) = run(&[], &[("SM_KAFKA_PROPERTIES", &typo)]);
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("key=value"), "{output}");
    assert_hidden(&output);
}
