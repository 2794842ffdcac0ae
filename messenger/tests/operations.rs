//! Operations: the Grafana dashboards can work (every metric their queries name is exported by the
//! running services), the compose files parse and name only known images and existing paths,
//! `messagescheduler.sh`'s options behave (the Docker branch by its dry run), and the live page
//! works in headless Chromium.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use messenger::{Experiment, Faults, Messenger};
use scheduler::testkit::*;
use support::start_stack;

mod support;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every `sm_*` metric named in a dashboard query.
fn dashboard_metrics() -> BTreeSet<String> {
    let name = regex::Regex::new(r"\bsm_[a-z0-9_]+").unwrap();
    let mut names = BTreeSet::new();
    let dir = root().join("compose/grafana/dashboards");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(
            dash["title"].is_string() && dash["uid"].is_string(),
            "{path:?} is a dashboard"
        );
        let panels = dash["panels"].as_array().expect("panels");
        assert!(!panels.is_empty());
        for panel in panels {
            assert_eq!(
                panel["datasource"]["uid"], "prometheus",
                "{path:?}: provisioned data source"
            );
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                names.extend(name.find_iter(expr).map(|m| m.as_str().to_string()));
            }
        }
        files += 1;
    }
    assert_eq!(
        files, 3,
        "Scheduling latency, Scheduler internals, Experiment"
    );
    names
}

fn exported(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_name_only_exported_metrics_and_the_live_page_works() {
    let stack = start_stack("ops", 2, 0.9).await;
    let (names, conn) = (&stack.names, stack.conn.clone());
    let exp = Experiment {
        count: 60,
        rate: Some(30.0),
        min_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(3),
        grace: Duration::from_secs(10),
        // Due 1-3 s ahead: too close for the workload to change any (see `CHANGE_LEAD`).
        cancel_share: 0.0,
        reschedule_share: 0.0,
        ..Default::default()
    };
    let m = Arc::new(Messenger::start(conn, exp.clone()).await.unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let messenger_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(messenger::serve_on(
        listener,
        m.clone(),
        std::future::pending(),
    ));

    // A bad record, so the dead-letter metric exists; then a run to its end (the report gauges).
    produce(&producer(), &names.ingest, None, b"bad", &[("topic", b"x")]).await;
    let report = m.run_experiment(&exp, &Faults::default()).await.unwrap();
    assert!(report.ok(), "{}", report.table());

    let mut seen = BTreeSet::new();
    for url in [
        format!("http://{}", stack.scheduler.http_addr),
        format!("http://{}", stack.baseline.http_addr),
        messenger_url.clone(),
    ] {
        let text = reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        seen.extend(exported(&text));
    }
    let wanted = dashboard_metrics();
    let missing: Vec<&String> = wanted.iter().filter(|n| !seen.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "dashboards query metrics nobody exports: {missing:?}"
    );
    eprintln!("{} dashboard metrics, all exported", wanted.len());

    // The progress views read the running messenger.
    let script = root().join("messagescheduler.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("-p")
        .env("SM_MESSENGER_URL", &messenger_url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("kafka") && text.contains("mysql") && text.contains("p99 ms"),
        "{text}"
    );
    let out = Command::new("bash")
        .arg(&script)
        .arg("-pl")
        .env("SM_MESSENGER_URL", &messenger_url)
        .env("SM_PROGRESS_FRAMES", "2")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "-pl failed: {text}");
    assert_eq!(
        text.matches("\x1b[H\x1b[J").count(),
        2,
        "refreshes in place: {text}"
    );

    // The live page in headless Chromium, while a second run delivers: its figures move, and once
    // the run has reported it shows `/api/report`'s numbers and a chart with a time axis.
    // 10 s of producing: long enough that the page, once Chromium is up, sees figures move.
    let second = Experiment {
        count: 200,
        rate: Some(20.0),
        min_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(3),
        ..exp
    };
    let per_path = second.count;
    let runner = {
        let m = m.clone();
        tokio::spawn(async move { m.run_experiment(&second, &Faults::default()).await })
    };
    let shot = root().join("target/live-page.png");
    let web = root().join("messenger/web-test");
    // The script's own waits end within about 4 minutes; this deadline is for a hung browser.
    let node = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new("node")
            .arg(web.join("live-page.mjs"))
            .arg(&messenger_url)
            .arg(&shot)
            .arg(per_path.to_string())
            .current_dir(&web)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the live page test ends within 5 minutes")
    .expect("node runs (./messagescheduler.sh --test installs Chromium and playwright-core)");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&node.stdout),
        String::from_utf8_lossy(&node.stderr),
    );
    assert!(
        node.status.success(),
        "live page test failed: {stdout}{stderr}"
    );
    eprintln!("{stdout}");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot was taken"
    );
    let report = runner.await.unwrap().unwrap();
    assert!(report.ok(), "{}", report.table());

    stack.stop().await;
}

const KNOWN_IMAGES: [&str; 8] = [
    "apache/kafka:",
    "provectuslabs/kafka-ui:",
    "mongo:",
    "mongo-express:",
    "mysql:",
    "adminer:",
    "prom/prometheus:",
    "grafana/grafana:",
];

/// Compose runs the Kafka version the local stack runs: the `apache/kafka` image's tag is the
/// version broker/pom.xml pins.
#[test]
fn compose_runs_the_kafka_version_of_the_local_stack() {
    let pom = std::fs::read_to_string(root().join("broker/pom.xml")).unwrap();
    let pinned = pom
        .split_once("<kafka.version>")
        .and_then(|(_, rest)| rest.split_once("</kafka.version>"))
        .map(|(v, _)| v.trim().to_string())
        .expect("broker/pom.xml pins <kafka.version>");
    let compose: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("compose/kafka.yml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        compose["services"]["kafka"]["image"].as_str(),
        Some(format!("apache/kafka:{pinned}").as_str())
    );
}

/// The compose files parse; every service names a known image (pinned) or builds an existing
/// Dockerfile target; every file they mount or read exists; all share one network.
#[test]
fn compose_files_parse_and_name_only_images_and_paths_that_exist() {
    let dir = root().join("compose");
    let dockerfile = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
    let mut services = BTreeSet::new();
    for file in [
        "kafka.yml",
        "scheduler.yml",
        "messenger.yml",
        "db-scheduler.yml",
        "monitoring.yml",
    ] {
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join(file)).unwrap())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            doc["networks"]["default"]["name"].as_str(),
            Some("messagescheduler"),
            "{file}"
        );
        for (name, svc) in doc["services"].as_mapping().expect("services") {
            let name = name.as_str().unwrap().to_string();
            if let Some(build) = svc.get("build") {
                let target = build["target"].as_str().expect("a build target");
                assert!(
                    dockerfile.contains(&format!("AS {target}")),
                    "{file}/{name}: no stage {target}"
                );
                assert!(dir
                    .join(build["context"].as_str().unwrap())
                    .join(build["dockerfile"].as_str().unwrap())
                    .exists());
            } else {
                let image = svc["image"].as_str().expect("an image");
                assert!(
                    KNOWN_IMAGES.iter().any(|k| image.starts_with(k)),
                    "{file}/{name}: unknown image {image}"
                );
                assert!(!image.ends_with(":latest"), "{file}/{name}: pin {image}");
            }
            if let Some(env_file) = svc.get("env_file") {
                assert!(
                    dir.join(env_file.as_str().unwrap()).exists(),
                    "{file}/{name}: env_file"
                );
            }
            for volume in svc
                .get("volumes")
                .and_then(|v| v.as_sequence())
                .into_iter()
                .flatten()
            {
                let source = volume.as_str().unwrap().split(':').next().unwrap();
                if source.starts_with('.') {
                    assert!(
                        dir.join(source).exists(),
                        "{file}/{name}: {source} does not exist"
                    );
                }
            }
            services.insert(name);
        }
    }
    for svc in [
        "kafka",
        "scheduler",
        "db-scheduler",
        "messenger",
        "mongo",
        "mysql",
        "prometheus",
        "grafana",
        "kafka-ui",
        "mongo-express",
        "adminer",
    ] {
        assert!(services.contains(svc), "{svc} is defined");
    }
    // Prometheus scrapes services that exist, on the ports they listen on.
    let prom: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(dir.join("prometheus/prometheus.yml")).unwrap(),
    )
    .unwrap();
    let targets: Vec<String> = prom["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|j| {
            j["static_configs"][0]["targets"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(
        targets,
        ["scheduler:8000", "db-scheduler:8001", "messenger:5000"]
    );
}

fn script(args: &[&str], docker: &str) -> (bool, String) {
    let out = Command::new("bash")
        .arg(root().join("messagescheduler.sh"))
        .args(args)
        .env("SM_DOCKER", docker)
        .env(
            "SM_STACK_DIR",
            std::env::temp_dir().join(unique("no-stack")),
        )
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The script's options: help lists them all; with Docker (by its dry run) each maps to the right
/// compose command; unknown options fail.
#[test]
fn every_option_of_the_script_does_what_it_says() {
    let (ok, help) = script(&["--help"], "0");
    assert!(ok);
    for opt in [
        "--all",
        "--app",
        "--exp",
        "--gui",
        "--grafana",
        "--clean",
        "--deep-clean",
        "--progress",
        "--progress-live",
        "--stop",
        "--stack",
        "--test",
        "-dc",
        "-pl",
    ] {
        assert!(help.contains(opt), "help lists {opt}");
    }
    let (ok, out) = script(&["--dry-run", "--all"], "1");
    assert!(ok, "{out}");
    assert!(
        out.contains("docker compose")
            && out.contains("monitoring.yml")
            && out.contains("--profile gui")
            && out.contains("up -d --build --wait"),
        "{out}"
    );
    assert!(
        out.contains("/produce-messages"),
        "--all starts the experiment: {out}"
    );
    let (ok, out) = script(&["--dry-run", "--app"], "1");
    assert!(ok, "the script failed: {out}");
    assert!(
        out.contains("scheduler.yml") && !out.contains("messenger.yml"),
        "--app is the scheduler alone: {out}"
    );
    let (ok, out) = script(&["--dry-run"], "1");
    assert!(ok, "the script failed: {out}");
    assert!(
        out.contains("messenger.yml")
            && out.contains("db-scheduler.yml")
            && !out.contains("monitoring.yml")
            && out.contains("/produce-messages"),
        "--exp is the default: {out}"
    );
    let (ok, out) = script(&["--dry-run", "--exp", "--grafana"], "1");
    assert!(ok, "the script failed: {out}");
    assert!(
        out.contains("monitoring.yml") && !out.contains("--profile gui"),
        "{out}"
    );
    let (ok, out) = script(&["--dry-run", "--exp", "--gui"], "1");
    assert!(ok, "the script failed: {out}");
    assert!(
        out.contains("--profile gui") && !out.contains("monitoring.yml"),
        "{out}"
    );
    let (ok, out) = script(&["--dry-run", "-s"], "1");
    assert!(ok, "the script failed: {out}");
    assert!(out.contains("down --remove-orphans"), "{out}");
    let (ok, out) = script(&["--dry-run", "-c"], "1");
    assert!(ok, "the script failed: {out}");
    assert!(
        out.contains("target/release/scheduler") && out.contains("logs"),
        "-c removes our binaries and the stack's logs: {out}"
    );
    let whole_target = format!("{} ", root().join("target").display());
    assert!(
        !out.contains(&whole_target),
        "-c leaves the rest of target/: {out}"
    );
    let (ok, out) = script(&["--dry-run", "-dc"], "1");
    assert!(ok, "the script failed: {out}");
    assert!(
        out.contains("down --volumes --rmi local")
            && out.contains(&whole_target)
            && out.contains("deep clean: removing"),
        "-dc removes everything and says what: {out}"
    );
    let (ok, out) = script(&["--dry-run", "--exp"], "0");
    assert!(ok, "the script failed: {out}");
    assert!(
        out.contains("no Docker engine") && !out.contains("docker compose"),
        "{out}"
    );
    let (ok, out) = script(&["--bogus"], "0");
    assert!(!ok && out.contains("unknown option"), "{out}");
}

/// `--exp` posts the whole experiment (compose/experiment.env under the caller's `SM_EXP_*`) to
/// the messenger, so a second `--exp` with other settings runs those, although the messenger
/// already running read its environment when it started. The body is what the messenger's
/// `Experiment` reads; settings that are not the experiment's (the senders') are left out.
#[test]
fn a_second_exp_runs_the_callers_settings() {
    let out = script_with(
        &["--dry-run", "--exp"],
        &std::env::temp_dir().join(unique("no-stack")),
        &[
            ("SM_EXP_COUNT", "200".into()),
            ("SM_EXP_MYSQL", "false".into()),
            ("SM_EXP_MAX_DELAY", "1m".into()),
            ("SM_EXP_RATE", "12.5".into()),
            ("SM_EXP_SENDERS", "9".into()),
        ],
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let body = text
        .lines()
        .find_map(|l| l.split_once("SM_EXP_*: ").map(|(_, b)| b))
        .unwrap_or_else(|| panic!("no experiment body logged: {text}"));
    let fields: serde_json::Value = serde_json::from_str(body).expect("the body is JSON");
    assert!(fields.get("senders").is_none(), "{body}");
    let exp: Experiment = serde_json::from_value(fields).expect("the messenger reads it");
    assert_eq!(exp.count, 200);
    assert!(!exp.mysql && exp.kafka, "{body}");
    assert_eq!(exp.max_delay, Duration::from_secs(60));
    assert_eq!(exp.rate, Some(12.5));
    assert_eq!(
        exp.duration,
        Duration::from_secs(3600),
        "from experiment.env"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/produce-messages"),
        "the run is posted"
    );
}

/// The port of the broker this test run uses (`--test` starts one of its own on a free port), so
/// that the script finds it running rather than starting another.
fn broker_port() -> String {
    let servers = std::env::var("SM_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    servers
        .rsplit_once(':')
        .map_or("9092", |(_, port)| port)
        .to_string()
}

/// The script run without Docker against a stack directory of the test's own, on the test run's
/// broker (found on its port, as a user's second checkout would find it), with extra environment;
/// returns the finished process's output. MySQL is the test run's too, given by `SM_MYSQL_URL`
/// (the script starts none then): its account belongs to the run's stack directory.
fn script_with(args: &[&str], stack: &Path, env: &[(&str, String)]) -> std::process::Output {
    script_command(args, stack, env).output().unwrap()
}

/// The command `script_with` runs, to spawn rather than wait.
fn script_command(args: &[&str], stack: &Path, env: &[(&str, String)]) -> Command {
    let mut command = Command::new("bash");
    command
        .arg(root().join("messagescheduler.sh"))
        .args(args)
        .env("SM_DOCKER", "0")
        .env("SM_STACK_DIR", stack)
        .env_remove("SM_BOOTSTRAP_SERVERS")
        .env_remove("SM_MONGODB_URI")
        .env("SM_KAFKA_PORT", broker_port())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    command
}

/// Waits (up to 20 s) until something listens on `port`; panics with `what` if nothing does.
fn wait_for_port(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `-s` with this stack directory succeeds, and `pid` (a process the script started) is gone.
fn stop_and_check_gone(stack: &Path, env: &[(&str, String)], pid: u32) {
    let out = script_with(&["-s"], stack, env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "-s stopped pid {pid}, which it started"
    );
}

/// `-s` stops the services before the servers they talk to: a scheduler stopping cleanly publishes
/// what its timer holds and commits, which it cannot do once the broker is gone (in the order of
/// their names the broker went first, and the messenger waited out its whole grace period).
/// Detached stand-ins, named by the stack's PID files, play the broker and the scheduler.
#[test]
fn stop_takes_the_services_down_before_the_servers() {
    let stack = std::env::temp_dir().join(unique("stack"));
    std::fs::create_dir_all(stack.join("pids")).unwrap();
    let stand_in = |name: &str| -> u32 {
        let pid = detached_sleep();
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let pids = stack.join("pids");
        std::fs::write(pids.join(format!("{name}.pid")), pid.to_string()).unwrap();
        std::fs::write(
            pids.join(format!("{name}.cmd")),
            String::from_utf8_lossy(&cmd).replace('\0', " "),
        )
        .unwrap();
        pid
    };
    let broker = stand_in("kafka");
    let scheduler = stand_in("scheduler");
    let out = script_with(&["-s"], &stack, &[("SM_SHUTDOWN_TIMEOUT", "1s".into())]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let at = |what: String| {
        text.find(&what)
            .unwrap_or_else(|| panic!("no '{what}' in: {text}"))
    };
    assert!(
        at(format!("stopping scheduler (pid {scheduler})"))
            < at(format!("stopping kafka (pid {broker})")),
        "the scheduler stops while the broker still answers: {text}"
    );
    assert!(!stack.join("pids/kafka.pid").exists() && !stack.join("pids/scheduler.pid").exists());
    let _ = std::fs::remove_dir_all(&stack);
}

/// A `sleep 600` that is not this test's child (its shell exits at once), so that it is reaped as
/// soon as it is stopped, as a process the script started would be; returns its pid.
fn detached_sleep() -> u32 {
    let out = Command::new("sh")
        .args(["-c", "sleep 600 >/dev/null 2>&1 & echo $!"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Two actions in one command line are refused with a message, never the last one silently.
#[test]
fn conflicting_options_are_refused() {
    for args in [
        &["--test", "--stop"][..],
        &["-c", "--all"],
        &["--app", "-p"],
        &["-pl", "-dc"],
    ] {
        let (ok, out) = script(args, "0");
        assert!(!ok, "{args:?} ran: {out}");
        assert!(out.contains("conflict"), "{args:?}: {out}");
    }
    let (ok, out) = script(&["--dry-run", "--exp", "--exp"], "0");
    assert!(ok, "the same action twice is not a conflict: {out}");
}

/// `-p` with the messenger down: one clear line on stderr, nothing on stdout, a failed exit.
#[test]
fn progress_with_the_messenger_down_says_so_in_one_line() {
    let stack = std::env::temp_dir().join(unique("no-stack"));
    let url = format!("http://127.0.0.1:{}", free_port());
    let out = script_with(&["-p"], &stack, &[("SM_MESSENGER_URL", url)]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success());
    assert!(stdout.is_empty(), "{stdout}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("does not answer"), "{stderr}");
}

/// Ctrl-C (SIGINT) in the live view ends the view, with a zero exit and a word on how to stop
/// the services (which run in sessions of their own, see the next test).
#[test]
fn ctrl_c_in_the_live_view_ends_the_view_only() {
    let stack = std::env::temp_dir().join(unique("no-stack"));
    let out_file = std::env::temp_dir().join(unique("live-view"));
    let mut view = Command::new("bash")
        .arg(root().join("messagescheduler.sh"))
        .arg("-pl")
        .env("SM_DOCKER", "0")
        .env("SM_STACK_DIR", &stack)
        .env(
            "SM_MESSENGER_URL",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&out_file)
        .unwrap_or_default()
        .contains("waiting for the messenger")
    {
        assert!(std::time::Instant::now() < deadline, "the view never drew");
        std::thread::sleep(Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-INT", &view.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = view.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the view ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(view.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("services keep running") && stderr.contains("-s"),
        "{stderr}"
    );
}

/// A port held by a process the script did not start is reported (with its pid) and left
/// alone; what the script starts runs in a session of its own (a Ctrl-C in the terminal does not
/// reach it); `-s` stops only what the script started.
#[test]
fn a_foreign_process_on_a_port_is_reported_and_left_alone() {
    let stack = std::env::temp_dir().join(unique("stack"));
    let foreign_port = free_port();
    let port = foreign_port.to_string();
    let mut foreign = spawn_binary(
        "python3",
        &["-m", "http.server", &port, "--bind", "127.0.0.1"].map(String::from),
        "foreign-http.log",
    );
    wait_for_port(foreign_port, "the foreign server did not start");
    // The broker's port is free (the script starts a broker there); MongoDB's is the foreign one.
    let env = [
        ("SM_KAFKA_PORT", free_port().to_string()),
        ("SM_MONGO_PORT", port.clone()),
    ];
    let out = script_with(&["--stack"], &stack, &env);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!("held by pid {}", foreign.id())) && text.contains("did not start"),
        "{text}"
    );
    assert!(
        foreign.try_wait().unwrap().is_none(),
        "the foreign process was killed"
    );

    let broker: u32 = std::fs::read_to_string(stack.join("pids/kafka.pid"))
        .expect("the script started a broker")
        .trim()
        .parse()
        .unwrap();
    assert_ne!(
        session_of("self"),
        session_of(&broker.to_string()),
        "the broker runs in a session of its own"
    );

    stop_and_check_gone(&stack, &env, broker);
    assert!(
        foreign.try_wait().unwrap().is_none(),
        "-s left the foreign process alone"
    );
    let _ = std::fs::remove_dir_all(&stack);
}

/// The session id of a process (`self` for this one), from `/proc/PID/stat`.
fn session_of(pid: &str) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(3))
        .and_then(|s| s.parse().ok())
        .unwrap()
}

/// A MongoDB server started by another checkout of this project is used, however long that
/// checkout's path: the script recognises the program from the whole command line, not from the
/// shortened form it prints (a long CI path once hid `secantusd-py` and the server was refused).
/// The stand-in is a listener whose script is named `secantusd-py`; the broker is the test run's,
/// reused the same way.
#[test]
fn a_stack_server_of_another_checkout_is_used_however_long_its_path() {
    let stack = std::env::temp_dir().join(unique("stack"));
    std::fs::create_dir_all(&stack).unwrap();
    // The checkout's venv (the --test run installed it): the script finds its programs there
    // rather than installing them again.
    std::os::unix::fs::symlink(root().join(".stack/venv"), stack.join("venv")).unwrap();
    let long = std::env::temp_dir()
        .join(unique("another-checkout"))
        .join("a".repeat(60))
        .join(".stack/venv/bin");
    std::fs::create_dir_all(&long).unwrap();
    let program = long.join("secantusd-py");
    std::fs::write(
        &program,
        "import socket, sys, time\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1', int(sys.argv[1])))\n\
         s.listen()\n\
         while True:\n    time.sleep(60)\n",
    )
    .unwrap();
    let mongo_port = free_port();
    let port = mongo_port.to_string();
    let mut stand_in = spawn_binary(
        "python3",
        &[program.display().to_string(), port.clone()],
        "stand-in-mongo.log",
    );
    wait_for_port(mongo_port, "the stand-in did not start");
    let env = [("SM_MONGO_PORT", port)];
    let out = script_with(&["--stack"], &stack, &env);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "mongo: 127.0.0.1:{mongo_port} is held by pid {}",
            stand_in.id()
        )) && text.contains("using it"),
        "{text}"
    );
    assert!(
        !stack.join("pids/mongo.pid").exists(),
        "no MongoDB was started"
    );
    assert!(
        stand_in.try_wait().unwrap().is_none(),
        "the other checkout's server was left running"
    );
    let out = script_with(&["-s"], &stack, &env);
    assert!(out.status.success());
    assert!(
        stand_in.try_wait().unwrap().is_none(),
        "-s left the other checkout's server alone"
    );
    let _ = std::fs::remove_dir_all(&stack);
}

/// `--app` twice with an unchanged binary keeps the running scheduler; after a rebuild (here: a
/// new copy of the binary) `--app` restarts it and says so, so the new code runs; `-s` stops it.
/// Runs the workspace's debug build through `SM_BIN_DIR`, on the running stack, with topics and
/// a group of its own and a short ladder.
#[test]
fn a_rebuilt_binary_is_restarted_by_app() {
    let built = root().join("target/debug/scheduler");
    assert!(
        built.exists(),
        "the workspace's debug scheduler (cargo test --workspace builds it)"
    );
    let bins = std::env::temp_dir().join(unique("bins"));
    std::fs::create_dir_all(&bins).unwrap();
    let bin = bins.join("scheduler");
    std::fs::copy(&built, &bin).unwrap();
    let stack = std::env::temp_dir().join(unique("stack"));
    let names = Names::new("app");
    let port = free_port();
    let env = [
        ("SM_BIN_DIR", bins.display().to_string()),
        ("SM_SCHEDULER_PORT", port.to_string()),
        ("SM_INGEST_TOPIC", names.ingest.clone()),
        ("SM_GROUP_ID", names.group.clone()),
        ("SM_SLICE_PREFIX", names.prefix.clone()),
        ("SM_LARGEST_SLICE", "16s".to_string()),
        ("SM_INGEST_PARTITIONS", "2".to_string()),
        ("SM_SHUTDOWN_TIMEOUT", "5s".to_string()),
    ];
    let pid = || -> u32 {
        std::fs::read_to_string(stack.join("pids/scheduler.pid"))
            .expect("a pid file")
            .trim()
            .parse()
            .unwrap()
    };
    let app = |what: &str| {
        let out = script_with(&["--app"], &stack, &env);
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{what}: {text}");
        text
    };
    app("first start");
    let first = pid();
    let text = app("unchanged");
    assert!(text.contains("already running"), "{text}");
    assert_eq!(pid(), first, "an unchanged binary keeps running");

    // A rebuild: a new binary at the same path, with a later modification time.
    std::fs::remove_file(&bin).unwrap();
    std::fs::copy(&built, &bin).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&bin)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let text = app("rebuilt");
    assert!(text.contains("restarting scheduler"), "{text}");
    let second = pid();
    assert_ne!(second, first, "the rebuilt binary runs");
    assert!(
        !Path::new(&format!("/proc/{first}")).exists(),
        "the old one stopped"
    );
    // The new one answers, and works: it owns partitions (an answer alone comes before that).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let health = Command::new("curl")
            .args(["-fsS", &format!("http://127.0.0.1:{port}/healthz")])
            .output()
            .unwrap();
        let body: serde_json::Value =
            serde_json::from_slice(&health.stdout).unwrap_or(serde_json::Value::Null);
        if health.status.success()
            && body["status"] == "ok"
            && body["assigned_partitions"].as_u64().unwrap_or(0) > 0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rebuilt scheduler never owned partitions: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    stop_and_check_gone(&stack, &env, second);
    let _ = std::fs::remove_dir_all(&stack);
    let _ = std::fs::remove_dir_all(&bins);
}

/// A stack directory of the test's own whose Python environment is the checkout's (the `--test`
/// run installed it), so that the script does not install it again.
fn stack_with_venv() -> PathBuf {
    let stack = std::env::temp_dir().join(unique("stack"));
    std::fs::create_dir_all(&stack).unwrap();
    std::os::unix::fs::symlink(root().join(".stack/venv"), stack.join("venv")).unwrap();
    stack
}

/// The environment of a `--stack` whose broker would start on free ports of its own.
fn fresh_broker_env() -> Vec<(&'static str, String)> {
    vec![
        ("SM_KAFKA_PORT", free_port().to_string()),
        ("SM_KAFKA_CONTROLLER_PORT", free_port().to_string()),
    ]
}

/// `--stack` with `env`: it must fail, and say `says` on stderr; returns stderr.
fn stack_refused(stack: &Path, env: &[(&str, String)], says: &str) -> String {
    let out = script_with(&["--stack"], stack, env);
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "--stack succeeded: {text}");
    assert!(text.contains(says), "no '{says}' in: {text}");
    text
}

/// A Kafka data directory that is not this stack's to run is refused with a message and left as
/// it was: one formatted for another cluster, one formatted by a newer Kafka, one this script did
/// not format. Nothing is started for it.
#[test]
fn a_kafka_data_directory_of_another_cluster_or_version_is_refused_and_left_alone() {
    let cases = [
        (Some("4.4.0 OtherClusterIdAAAAAAA"), "belongs to cluster"),
        (
            Some("99.0.0 ThisClusterIdAAAAAAAAA"),
            "formatted by Kafka 99.0.0, newer than",
        ),
        (None, "did not format"),
    ];
    for (record, says) in cases {
        let stack = stack_with_venv();
        let data = stack.join("kafka/data");
        std::fs::create_dir_all(&data).unwrap();
        let meta = "version=1\nnode.id=1\ncluster.id=ThisClusterIdAAAAAAAAA\n";
        std::fs::write(data.join("meta.properties"), meta).unwrap();
        if let Some(record) = record {
            std::fs::write(stack.join("kafka/formatted-by"), format!("{record}\n")).unwrap();
        }
        stack_refused(&stack, &fresh_broker_env(), says);
        assert_eq!(
            std::fs::read_to_string(data.join("meta.properties")).unwrap(),
            meta,
            "the data directory was touched"
        );
        assert!(
            !stack.join("pids/kafka.pid").exists(),
            "a broker was started"
        );
        let _ = std::fs::remove_dir_all(&stack);
    }
}

/// A broker that exits during its start (here: its stored node id is not the configured one) is
/// reported with the last lines of its log, and leaves no PID file behind that `-s` would act on.
#[test]
fn a_broker_that_exits_during_start_is_reported_with_its_log() {
    let stack = stack_with_venv();
    let data = stack.join("kafka/data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("meta.properties"),
        "version=1\nnode.id=2\ndirectory.id=AAAAAAAAAAAAAAAAAAAAAA\ncluster.id=ThisClusterIdAAAAAAAAA\n",
    )
    .unwrap();
    std::fs::write(
        stack.join("kafka/formatted-by"),
        "4.4.0 ThisClusterIdAAAAAAAAA\n",
    )
    .unwrap();
    let text = stack_refused(&stack, &fresh_broker_env(), "kafka exited during start-up");
    assert!(
        text.contains("Stored node id 2"),
        "the broker's own reason is shown: {text}"
    );
    let _ = std::fs::remove_dir_all(&stack);
}

/// The Kafka port, or its controller port, held by a program the script did not start: named with
/// its pid, left running, and nothing started.
#[test]
fn a_foreign_process_on_a_kafka_port_is_reported_and_left_alone() {
    for which in ["SM_KAFKA_PORT", "SM_KAFKA_CONTROLLER_PORT"] {
        let stack = stack_with_venv();
        let port = free_port();
        let mut foreign = spawn_binary(
            "python3",
            &[
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ]
            .map(String::from),
            "foreign-kafka-port.log",
        );
        wait_for_port(port, "the foreign server did not start");
        let mut env = fresh_broker_env();
        env.retain(|(k, _)| *k != which);
        env.push((which, port.to_string()));
        stack_refused(
            &stack,
            &env,
            &format!("127.0.0.1:{port} is held by pid {}", foreign.id()),
        );
        assert!(foreign.try_wait().unwrap().is_none(), "{which}: killed");
        assert!(!stack.join("pids/kafka.pid").exists(), "{which}: started");
        let _ = std::fs::remove_dir_all(&stack);
    }
}

/// Maven failing to download the broker names the artifact; nothing is left that would pass for
/// a classpath.
#[test]
fn a_failed_kafka_download_names_the_artifact() {
    let stack = stack_with_venv();
    let home = std::env::temp_dir().join(unique("kafka-home"));
    let mut env = fresh_broker_env();
    env.push(("SM_KAFKA_VERSION", "0.0.1".into()));
    env.push(("SM_KAFKA_HOME", home.display().to_string()));
    stack_refused(&stack, &env, "org.apache.kafka:kafka_2.13:");
    assert!(
        !home.exists(),
        "a partial classpath was left at {}",
        home.display()
    );
    let _ = std::fs::remove_dir_all(&stack);
}

/// No Java (or no Maven) on the machine and no apt-get to install it: one clear message each.
/// PATH is the system's, less those programs.
#[test]
fn java_or_maven_missing_without_apt_is_a_clear_message() {
    for (missing, says) in [("java", "needs Java 17"), ("mvn", "needs Maven")] {
        let bin = std::env::temp_dir().join(unique("path"));
        std::fs::create_dir_all(&bin).unwrap();
        for dir in ["/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if [missing, "apt-get"].contains(&name.as_ref()) {
                    continue;
                }
                let _ = std::os::unix::fs::symlink(entry.path(), bin.join(name.as_ref()));
            }
        }
        let stack = stack_with_venv();
        let mut env = fresh_broker_env();
        env.push(("PATH", bin.display().to_string()));
        // An empty classpath directory: the script must collect it, so Maven is needed.
        env.push((
            "SM_KAFKA_HOME",
            std::env::temp_dir()
                .join(unique("kafka-home"))
                .display()
                .to_string(),
        ));
        stack_refused(&stack, &env, says);
        let _ = std::fs::remove_dir_all(&stack);
        let _ = std::fs::remove_dir_all(&bin);
    }
}

/// The test run's servers, given from outside as a user would give an existing cluster: the script
/// starts none of its own for them.
fn external_servers() -> Vec<(&'static str, String)> {
    ["SM_BOOTSTRAP_SERVERS", "SM_MONGODB_URI", "SM_MYSQL_URL"]
        .into_iter()
        .map(|key| {
            let value = std::env::var(key)
                .unwrap_or_else(|_| panic!("{key} names the test run's server (--test sets it)"));
            (key, value)
        })
        .collect()
}

/// Writes an executable script `name` with `body` into `dir`; returns its path.
fn executable(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Waits (up to `secs`) until `ready` holds; panics with `what` if it never does.
fn wait_until(secs: u64, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One run that changes something per stack directory: while `--test` runs (held in its test step
/// by a `cargo` of the test's own, first on `PATH`), a second run is refused and names the first
/// (its pid and its options); once the first ends, the second runs. Called by path from another
/// directory, the script runs `cargo` in the checkout, not in the caller's directory.
#[test]
fn one_run_at_a_time_and_cargo_runs_in_the_checkout() {
    let stack = stack_with_venv();
    let fake = std::env::temp_dir().join(unique("fake-cargo"));
    let (record, release) = (fake.join("record"), fake.join("release"));
    executable(
        &fake,
        "cargo",
        &format!(
            "#!/bin/sh\n\
             {{ pwd; echo \"$@\"; }} >'{record}.tmp' && mv '{record}.tmp' '{record}'\n\
             i=0\n\
             while [ ! -e '{release}' ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done\n",
            record = record.display(),
            release = release.display()
        ),
    );
    let elsewhere = std::env::temp_dir().join(unique("elsewhere"));
    std::fs::create_dir_all(&elsewhere).unwrap();
    let mut env = external_servers();
    env.push((
        "PATH",
        format!("{}:{}", fake.display(), std::env::var("PATH").unwrap()),
    ));
    let log = std::env::temp_dir().join(unique("first-run.log"));
    let mut first: ChildGuard = script_command(&["--test"], &stack, &env)
        .current_dir(&elsewhere)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap()
        .into();
    wait_until(120, "the first run never reached its tests", || {
        record.exists()
    });
    let recorded = std::fs::read_to_string(&record).unwrap();
    let mut lines = recorded.lines();
    assert_eq!(
        lines.next().map(PathBuf::from),
        Some(root()),
        "cargo runs in the checkout: {recorded}"
    );
    assert!(
        lines.next().unwrap_or("").starts_with("test --workspace"),
        "{recorded}"
    );

    let out = script_with(&["-s"], &stack, &env);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second run went ahead: {text}");
    assert!(
        text.contains("another run")
            && text.contains(&format!("pid {}", first.id()))
            && text.contains("--test"),
        "the refusal names the first run: {text}"
    );

    std::fs::write(&release, "").unwrap();
    let mut status = None;
    wait_until(60, "the first run did not end", || {
        status = first.try_wait().unwrap();
        status.is_some()
    });
    assert!(
        status.unwrap().success(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let out = script_with(&["-s"], &stack, &env);
    assert!(
        out.status.success(),
        "after the first run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&stack);
    let _ = std::fs::remove_dir_all(&fake);
}

/// The script SIGKILLed while it waits for a service it started: its PID and command line were
/// recorded before the service ran, so `-s` finds it and stops it; the service did not inherit the
/// script's lock (the next run is not refused). The service is a stand-in that never answers.
#[test]
fn a_run_killed_while_starting_a_service_leaves_nothing_stop_cannot_find() {
    let stack = stack_with_venv();
    let bins = std::env::temp_dir().join(unique("bins"));
    executable(
        &bins,
        "scheduler",
        "#!/bin/bash\n# A scheduler that never answers on its port.\ntrap 'exit 0' TERM\nwhile :; do sleep 0.1; done\n",
    );
    let mut env = external_servers();
    env.push(("SM_BIN_DIR", bins.display().to_string()));
    env.push(("SM_SCHEDULER_PORT", free_port().to_string()));
    let mut run: ChildGuard = script_command(&["--app"], &stack, &env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
        .into();
    let pid_file = stack.join("pids/scheduler.pid");
    let mut pid = 0;
    wait_until(60, "the script never started the scheduler", || {
        pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
    });
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the service outlived the script"
    );
    stop_and_check_gone(&stack, &env, pid);
    let _ = std::fs::remove_dir_all(&stack);
    let _ = std::fs::remove_dir_all(&bins);
}

/// `-s` stops a process only when its PID still runs the command line recorded before it was
/// started: a PID file without one, or with another command, names a process that is not ours
/// (a PID the system gave to something else), left alone with a word.
#[test]
fn stop_leaves_alone_a_pid_whose_command_line_is_not_the_recorded_one() {
    for recorded in [None, Some("/usr/sbin/mariadbd --no-defaults ")] {
        let stack = std::env::temp_dir().join(unique("stack"));
        std::fs::create_dir_all(stack.join("pids")).unwrap();
        let mut stranger: ChildGuard = Command::new("sleep").arg("600").spawn().unwrap().into();
        std::fs::write(stack.join("pids/mysql.pid"), stranger.id().to_string()).unwrap();
        if let Some(cmd) = recorded {
            std::fs::write(stack.join("pids/mysql.cmd"), cmd).unwrap();
        }
        let out = script_with(&["-s"], &stack, &[]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("leaving it alone"), "{recorded:?}: {text}");
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "{recorded:?}: -s stopped a process it had not started"
        );
        let _ = std::fs::remove_dir_all(&stack);
    }
}

/// The script reads a duration (`SM_SHUTDOWN_TIMEOUT`) as the scheduler does (humantime): the same
/// seconds, rounded up, for what both accept; what the scheduler refuses, the script refuses with
/// a message naming the setting, evaluating nothing in it.
#[test]
fn the_script_reads_durations_as_the_services_do() {
    let seconds_of = |value: &str| {
        Command::new("bash")
            .args([
                "-c",
                "source \"$1\"; seconds_of SM_SHUTDOWN_TIMEOUT \"$2\"",
                "sourcing",
            ])
            .arg(root().join("messagescheduler.sh"))
            .arg(value)
            .output()
            .unwrap()
    };
    for value in [
        "500ms",
        "20s",
        "1m",
        "1h",
        "1m 30s",
        "1m30s",
        "2days",
        "1 m",
        "90sec",
        "1.5s",
        "0.25s",
        "1h1m1s",
        "3w",
        "1M",
        "2y",
        "1999ms",
        "1000000us",
        "7days",
    ] {
        let want = humantime::parse_duration(value).expect(value);
        let want = want.as_secs() + u64::from(want.subsec_nanos() > 0);
        let out = seconds_of(value);
        assert!(
            out.status.success(),
            "{value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want.to_string(),
            "{value}"
        );
    }
    let marker = std::env::temp_dir().join(unique("evaluated"));
    let command = format!("$(touch {})s", marker.display());
    for value in [
        "20",
        "1.s",
        "-1s",
        "1 fortnight",
        "s",
        "1h-",
        &command,
        "`id`s",
        "$((1+1))s",
    ] {
        assert!(
            humantime::parse_duration(value).is_err(),
            "the scheduler would accept {value:?}"
        );
        let stack = std::env::temp_dir().join(unique("no-stack"));
        let out = script_with(&["-s"], &stack, &[("SM_SHUTDOWN_TIMEOUT", value.into())]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value:?} was accepted: {text}");
        assert!(
            text.contains(&format!("SM_SHUTDOWN_TIMEOUT={value}")),
            "{value:?}: {text}"
        );
    }
    assert!(!marker.exists(), "a command in the setting ran");
}

/// `-c` removes every piece of state the script created and says what: the servers' data, the
/// scheduler's index of ids, logs, PID files, a killed test run's broker data, the lock; it keeps
/// what is installed (the Python environment) and binaries it did not build (`SM_BIN_DIR`).
#[test]
fn clean_removes_every_piece_of_state_and_says_what() {
    let stack = stack_with_venv();
    for dir in [
        "kafka/data",
        "mongo",
        "mysql/data",
        "scheduler-state",
        "prometheus/data",
        "run",
        "logs",
        "pids",
        "test-kafka.Ab12Cd/data",
    ] {
        std::fs::create_dir_all(stack.join(dir)).unwrap();
        std::fs::write(stack.join(dir).join("something"), "x").unwrap();
    }
    std::fs::write(stack.join("lock"), "").unwrap();
    let bins = std::env::temp_dir().join(unique("bins"));
    let binary = executable(&bins, "scheduler", "#!/bin/sh\n");
    let out = script_with(
        &["-c"],
        &stack,
        &[("SM_BIN_DIR", bins.display().to_string())],
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let left: Vec<String> = std::fs::read_dir(&stack)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["venv"], "{text}");
    for said in [
        "index of ids",
        "broker's data",
        "MongoDB's",
        "MariaDB's",
        "Prometheus's",
        "logs and PID files",
        "test broker",
        "kept: ",
    ] {
        assert!(text.contains(said), "no '{said}' in: {text}");
    }
    assert!(binary.exists(), "-c removed binaries it did not build");
    let _ = std::fs::remove_dir_all(&stack);
    let _ = std::fs::remove_dir_all(&bins);
}

/// `--dry-run` is honoured or refused by every action: `-s` says what it would stop and stops
/// nothing; `--test`, `--stack`, `-p` and `-pl`, which have nothing to print instead, refuse it.
#[test]
fn dry_run_is_honoured_or_refused_by_every_action() {
    for action in ["--test", "--stack", "-p", "-pl"] {
        let (ok, out) = script(&["--dry-run", action], "0");
        assert!(!ok, "--dry-run {action} ran: {out}");
        assert!(out.contains("--dry-run"), "{action}: {out}");
    }
    let stack = std::env::temp_dir().join(unique("stack"));
    std::fs::create_dir_all(stack.join("pids")).unwrap();
    let ours = detached_sleep();
    std::fs::write(stack.join("pids/scheduler.pid"), ours.to_string()).unwrap();
    std::fs::write(stack.join("pids/scheduler.cmd"), "sleep 600 ").unwrap();
    let out = script_with(&["--dry-run", "-s"], &stack, &[]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("would stop scheduler (pid {ours})")),
        "{text}"
    );
    assert!(
        Path::new(&format!("/proc/{ours}")).exists() && stack.join("pids/scheduler.pid").exists(),
        "a dry run stopped something: {text}"
    );
    stop_and_check_gone(&stack, &[], ours);
    let _ = std::fs::remove_dir_all(&stack);
}

/// Root is needed only to install Debian packages: with them present, the stack's MariaDB starts
/// as the user who runs the script, and the project's database and account are made over its
/// socket (mariadb-install-db gives that user the socket login; the script once signed in as
/// root and was refused). Run as an unprivileged user of the test's own (when the tests run as
/// root), with the test run's broker and MongoDB given from outside, so that MariaDB alone starts.
#[test]
fn the_stack_runs_as_a_user_without_root() {
    let uid = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    let as_root = uid.trim() == "0";
    let user = "sm-newcomer";
    if as_root {
        let exists = Command::new("id")
            .arg(user)
            .output()
            .unwrap()
            .status
            .success();
        if !exists {
            let made = Command::new("useradd")
                .args(["--system", "--no-create-home", "--shell", "/bin/bash", user])
                .status()
                .unwrap();
            assert!(made.success(), "useradd {user}");
        }
    }
    // No Python environment: with the broker and MongoDB given, none is needed (and the
    // checkout's runs root's Python, which another user cannot reach).
    let stack = std::env::temp_dir().join(unique("stack"));
    std::fs::create_dir_all(&stack).unwrap();
    if as_root {
        let chown = Command::new("chown")
            .args(["-h", &format!("{user}:"), &stack.display().to_string()])
            .status()
            .unwrap();
        assert!(chown.success());
    }
    let port = free_port().to_string();
    let env = [
        ("SM_MYSQL_PORT", port.clone()),
        (
            "SM_BOOTSTRAP_SERVERS",
            std::env::var("SM_BOOTSTRAP_SERVERS").unwrap(),
        ),
        ("SM_MONGODB_URI", std::env::var("SM_MONGODB_URI").unwrap()),
    ];
    let run = |action: &str| {
        let mut command = if as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--", "bash"]);
            c
        } else {
            Command::new("bash")
        };
        command
            .arg(root().join("messagescheduler.sh"))
            .arg(action)
            .env("SM_DOCKER", "0")
            .env("SM_STACK_DIR", &stack)
            .env_remove("SM_MYSQL_URL")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap()
    };
    let out = run("--stack");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "--stack without root: {text}");
    assert!(text.contains("mysql started"), "{text}");
    // The project's account answers over TCP with the password the stack made.
    let password = std::fs::read_to_string(stack.join("mysql/password")).unwrap();
    let query = Command::new("mysql")
        .args([
            "--no-defaults",
            "--protocol=tcp",
            "-h127.0.0.1",
            &format!("-P{port}"),
            "-umessagescheduler",
            &format!("-p{}", password.trim()),
            "-N",
            "-e",
            "SELECT CURRENT_USER()",
            "messagescheduler",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&query.stdout).contains("messagescheduler@"),
        "{}",
        String::from_utf8_lossy(&query.stderr)
    );
    let out = run("-c");
    assert!(
        out.status.success(),
        "-c without root: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&stack);
}
