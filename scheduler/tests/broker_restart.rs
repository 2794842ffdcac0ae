//! The broker itself killed with SIGKILL mid-run and restarted (SQLite storage): the scheduler
//! reconnects and delivers everything, none early. This test runs its own broker on a free port,
//! so it lives in a test binary of its own (it points the whole process at that broker).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use scheduler::testkit::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A broker this test started: killed when dropped, so a failing test leaves no process behind.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        kill9(&mut self.0);
    }
}

/// Starts nisshi (installed by `./messagescheduler.sh --stack`) with SQLite storage in `dir`.
fn start_broker(dir: &Path, port: u16) -> Broker {
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new("nisshi")
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args([
            "--storage-engine",
            "sqlite://broker.db",
            "--group-initial-rebalance-delay",
            "0s",
            "--silent",
        ])
        .current_dir(dir)
        .env_remove("STORAGE_ENGINE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nisshi is installed (./messagescheduler.sh --stack)");
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Broker(child);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(Broker(child));
    panic!("the broker did not answer on {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_killed_and_restarted_mid_run_loses_nothing() {
    let dir = std::env::temp_dir().join(unique("broker"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let broker = start_broker(&dir, port);
    // Every helper of this test binary talks to this broker.
    std::env::set_var("SM_BOOTSTRAP_SERVERS", format!("127.0.0.1:{port}"));

    let names = Names::new("brk");
    create_topic(&names.target, 2).await;
    let sched = start_in_process(&names).await;
    let base = now_ms() + 1_500;
    let records: Vec<(String, i64)> = (0..600)
        .map(|i| (format!("r-{i}"), base + (i * 7_919) % 8_000))
        .collect();
    schedule_records(&names, &records).await;
    let due: std::collections::HashMap<String, i64> = records.into_iter().collect();
    let reader = reader(&names.target, 2);
    let before = collect(&reader, Duration::from_secs(30), |r| r.len() >= 100).await;
    assert!(!before.is_empty());

    drop(broker);
    let down_at = now_ms();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let broker = start_broker(&dir, port);
    let back_at = now_ms();
    let got = collect_all(&reader, due.keys(), before, Duration::from_secs(120)).await;
    assert_all_arrived(due.keys(), &got);
    for r in &got {
        let id = r.header("sm-id").unwrap();
        assert!(r.timestamp_ms >= due[&id], "{id} early");
    }
    // Records arrive again once the restarted broker serves the scheduler and this reader.
    let resumed = got
        .iter()
        .map(|r| r.received_ms)
        .filter(|&t| t > back_at)
        .min()
        .unwrap_or(back_at);
    eprintln!(
        "broker down for {:.1} s; deliveries seen again {:.1} s after it came back; {} records, {} duplicates",
        (back_at - down_at) as f64 / 1000.0,
        (resumed - back_at) as f64 / 1000.0,
        due.len(),
        got.len() - due.len()
    );
    let mut copies: std::collections::BTreeMap<usize, usize> = Default::default();
    for v in by_id(&got).values() {
        *copies.entry(v.len()).or_default() += 1;
    }
    eprintln!("records by number of copies: {copies:?}");
    sched.stop().await.expect("clean stop");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
