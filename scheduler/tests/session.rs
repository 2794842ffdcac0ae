//! The group's session timeout: `--session-timeout` asks for it, and the scheduler raises it to
//! the broker's `group.min.session.timeout.ms`, since a broker refuses a join below its minimum
//! and the process would then never get a partition. Each case runs on a broker of its own
//! (the stack's allows 2 s; Kafka's default floor is 6 s).

use std::time::{Duration, Instant};

use scheduler::testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_timeout_is_raised_to_the_brokers_minimum() {
    let lenient = Broker::start();
    let strict = Broker::start_with(&["group.min.session.timeout.ms=6000"]);
    for (broker, floor, asked, used) in [
        (&lenient, "2 s", "3s", 3_000),
        (&strict, "6 s", "3s", 6_000),
        (&strict, "6 s", "8s", 8_000),
    ] {
        let names = Names::new("sess");
        let bootstrap = broker.bootstrap();
        let sched = start_in_process_with(
            &names,
            &[
                "--bootstrap-servers",
                &bootstrap,
                "--session-timeout",
                asked,
            ],
        )
        .await;
        let http = sched.http_addr.to_string();
        let config: serde_json::Value = reqwest::get(format!("http://{http}/api/config"))
            .await
            .expect("config answers")
            .json()
            .await
            .expect("config is JSON");
        assert_eq!(
            config["session_timeout_ms"], used,
            "asked {asked} of a broker whose floor is {floor}"
        );
        // The group took it: the process is given partitions.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let assigned = healthz(&http).await["assigned_partitions"]
                .as_u64()
                .unwrap_or(0);
            if assigned > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no partition after 30 s with {asked} asked of a broker whose floor is {floor}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sched.stop().await.expect("clean stop");
    }
}
