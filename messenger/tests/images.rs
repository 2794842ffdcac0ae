//! The images, without a Docker engine: the compose files are what `docker compose config` accepts
//! (compose-go, the loader Docker Compose runs, through `compose/check`), and each service's binary
//! starts as its image would run it: as the image's user (uid 10001, no home directory), with the
//! image's environment under the compose file's, its state in the volume the image declares. Only
//! what differs between a container and this machine is mapped: the volume and the home directory
//! to local directories, the servers' addresses to the test run's, and names (topics, group,
//! databases) to the test's own.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scheduler::testkit::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The compose project the script runs with every file and profile, resolved by compose-go as
/// `docker compose config` resolves it (and refused as it would refuse it).
fn compose_config() -> serde_json::Value {
    let dir = root().join("compose");
    let out = Command::new("go")
        .args(["run", "."])
        .args(["--profile", "gui"])
        .args(
            [
                "kafka.yml",
                "scheduler.yml",
                "db-scheduler.yml",
                "messenger.yml",
                "monitoring.yml",
            ]
            .map(|f| dir.join(f)),
        )
        .current_dir(dir.join("check"))
        .output()
        .expect("go runs compose/check (Go is on the machine)");
    assert!(
        out.status.success(),
        "docker compose config would refuse the files: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the resolved project is JSON")
}

/// What a Dockerfile stage runs: its user, environment, volumes and command, its parents'
/// included (each `FROM <stage> AS <name>` inherits them).
#[derive(Debug, Default)]
struct Image {
    user: Option<String>,
    env: BTreeMap<String, String>,
    volumes: Vec<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    /// `useradd` in a `RUN`: the user's name and uid.
    users: BTreeMap<String, u32>,
}

fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn image(stage: &str) -> Image {
    let dockerfile = std::fs::read_to_string(root().join("compose/Dockerfile")).unwrap();
    // Instructions joined across `\` continuations, per stage.
    let mut stages: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let mut current = String::new();
    let mut line = String::new();
    for raw in dockerfile.lines() {
        let raw = raw.trim();
        if raw.starts_with('#') || raw.is_empty() {
            continue;
        }
        line.push_str(raw.trim_end_matches('\\'));
        line.push(' ');
        if raw.ends_with('\\') {
            continue;
        }
        let instruction = std::mem::take(&mut line);
        let mut words = instruction.split_whitespace();
        if words.next() == Some("FROM") {
            let base = words.next().unwrap().to_string();
            current = words.nth(1).unwrap_or_default().to_string();
            stages.insert(current.clone(), (base, Vec::new()));
        } else {
            stages.get_mut(&current).unwrap().1.push(instruction);
        }
    }
    let mut chain = vec![stage.to_string()];
    while let Some((base, _)) = stages.get(chain.last().unwrap()) {
        chain.push(base.clone());
    }
    let mut image = Image::default();
    for name in chain.iter().rev() {
        let Some((_, instructions)) = stages.get(name) else {
            continue;
        };
        for instruction in instructions {
            let (op, rest) = instruction.trim().split_once(' ').unwrap();
            match op {
                "USER" => image.user = Some(rest.trim().to_string()),
                "ENV" => {
                    for pair in rest.split_whitespace() {
                        let (k, v) = pair.split_once('=').expect("ENV KEY=VALUE");
                        image.env.insert(k.into(), v.into());
                    }
                }
                "VOLUME" => image.volumes.push(rest.trim().to_string()),
                "ENTRYPOINT" => image.entrypoint = json_list(rest),
                "CMD" => image.cmd = json_list(rest),
                "RUN" => {
                    for command in rest.split("&&") {
                        let words: Vec<&str> = command.split_whitespace().collect();
                        if words.first() == Some(&"useradd") {
                            let uid = words
                                .iter()
                                .position(|w| *w == "--uid")
                                .and_then(|i| words.get(i + 1))
                                .and_then(|u| u.parse().ok())
                                .expect("useradd --uid N");
                            image.users.insert(words.last().unwrap().to_string(), uid);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    image
}

/// A service's binary started as its image runs it, with `overrides` (addresses and names only)
/// over the image's and the compose project's (`config`, from [`compose_config`]) environment,
/// `volume` standing for the image's volume (if any). Returns the running process and the HTTP
/// port it was given.
fn start_as_the_image(
    config: &serde_json::Value,
    service: &str,
    stage: &str,
    http_addr_var: &str,
    volume: Option<&Path>,
    overrides: &[(&str, String)],
) -> (ChildGuard, u16) {
    let svc = &config["services"][service];
    let image = image(stage);
    let user = image.user.as_deref().expect("the image names a user");
    let uid = *image
        .users
        .get(user)
        .unwrap_or_else(|| panic!("{stage}: the image creates {user} with a uid"));
    assert_ne!(uid, 0, "{stage} runs as root");
    // Docker's environment for the container: the base image's PATH, HOME from the user's passwd
    // entry (useradd's default /home/<user>, which --no-create-home leaves missing), the image's
    // ENV, then the compose file's environment.
    let home = format!("/home/{user}");
    let mut env: BTreeMap<String, String> = BTreeMap::from([
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), home.clone()),
        ("HOSTNAME".into(), unique("container")),
    ]);
    env.extend(image.env.clone());
    for (k, v) in svc["environment"].as_object().expect("an environment") {
        env.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
    }
    // The home directory is missing and cannot be made by the user: its parent is root's.
    let closed = std::env::temp_dir().join(unique("closed"));
    std::fs::create_dir_all(&closed).unwrap();
    let missing_home = closed.join("home");
    for value in env.values_mut() {
        if *value == home {
            *value = missing_home.display().to_string();
        }
        if let (Some(volume), Some(path)) = (volume, image.volumes.first()) {
            if value == path {
                *value = volume.display().to_string();
            }
        }
    }
    let port = free_port();
    env.insert(http_addr_var.into(), format!("127.0.0.1:{port}"));
    for (k, v) in overrides {
        env.insert((*k).into(), v.clone());
    }
    // The binary, readable and runnable by the image's user.
    let bin = root().join("target/debug").join(&image.entrypoint[0]);
    assert!(
        bin.exists(),
        "{} (cargo test --workspace builds it)",
        bin.display()
    );
    let dir = std::env::temp_dir().join(unique("image-bin"));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(&image.entrypoint[0]);
    std::fs::copy(&bin, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let args: Vec<String> = match svc["command"].as_array() {
        Some(command) => command
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect(),
        None => image.cmd.clone(),
    };
    let log =
        std::fs::File::create(std::env::temp_dir().join(format!("{service}-image.log"))).unwrap();
    let child = Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
        ])
        .arg(&copy)
        .args(&args)
        .env_clear()
        .envs(&env)
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("setpriv (util-linux) runs");
    (child.into(), port)
}

/// Waits (up to 90 s) until `http://127.0.0.1:PORT/healthz` answers 200; panics with the log of
/// `service` when the process exits first or nothing answers.
fn wait_healthy(child: &mut ChildGuard, port: u16, service: &str) {
    let log = || {
        std::fs::read_to_string(std::env::temp_dir().join(format!("{service}-image.log")))
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "{service} exited ({status}) as its image runs it: {}",
                log()
            );
        }
        let ok = Command::new("curl")
            .args(["-fsS", "-o", "/dev/null"])
            .stderr(Stdio::null())
            .arg(format!("http://127.0.0.1:{port}/healthz"))
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service} never answered /healthz: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGTERM, then a clean exit within the compose file's stop grace period.
fn stops_cleanly(mut child: ChildGuard, service: &str) {
    let term = Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "{service} ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{service} stopped with {status}");
}

/// The scheduler's image keeps its index of ids in the volume it declares (its user has no
/// home), the compose file mounts that volume, and the binary starts as the image's user with the
/// image's environment, answers, writes its index there and stops cleanly.
#[test]
fn the_scheduler_image_starts_as_its_user_with_its_state_in_a_volume() {
    let config = compose_config();
    let image = image("scheduler");
    let state = image
        .env
        .get("SM_STATE_DIR")
        .expect("the image sets SM_STATE_DIR: its user has no home directory");
    assert!(
        image.volumes.contains(state),
        "the image declares {state} a volume: {:?}",
        image.volumes
    );
    let mounted: Vec<&str> = config["services"]["scheduler"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "volume")
        .filter_map(|v| v["target"].as_str())
        .collect();
    assert!(
        mounted.contains(&state.as_str()),
        "compose mounts a volume at {state}: {mounted:?}"
    );

    // A new volume starts as the image's directory: owned by the image's user.
    let volume = std::env::temp_dir().join(unique("state-volume"));
    std::fs::create_dir_all(&volume).unwrap();
    let uid = image.users[image.user.as_deref().unwrap()];
    std::os::unix::fs::chown(&volume, Some(uid), Some(uid)).unwrap();
    std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o750)).unwrap();
    let names = Names::new("image");
    let (mut child, port) = start_as_the_image(
        &config,
        "scheduler",
        "scheduler",
        "SM_HTTP_ADDR",
        Some(&volume),
        &[
            ("SM_BOOTSTRAP_SERVERS", bootstrap()),
            ("SM_INGEST_TOPIC", names.ingest.clone()),
            ("SM_GROUP_ID", names.group.clone()),
            ("SM_SLICE_PREFIX", names.prefix.clone()),
            ("SM_LARGEST_SLICE", "16s".into()),
            ("SM_INGEST_PARTITIONS", "2".into()),
        ],
    );
    wait_healthy(&mut child, port, "scheduler");
    let written: Vec<PathBuf> = std::fs::read_dir(&volume)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!written.is_empty(), "the index of ids is in the volume");
    for path in &written {
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(path).unwrap());
        assert_eq!(owner, uid, "{} is the image user's", path.display());
    }
    stops_cleanly(child, "scheduler");
    let _ = std::fs::remove_dir_all(&volume);
}

/// The baseline's and the messenger's images start as their user with their environment too
/// (neither keeps state of its own: their data is in MySQL and MongoDB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_baseline_and_messenger_images_start_as_their_user() {
    let config = compose_config();
    let database = db_scheduler::testkit::fresh_database().await;
    let names = Names::new("image-msg");
    let (mut baseline, port) = start_as_the_image(
        &config,
        "db-scheduler",
        "db-scheduler",
        "SM_DB_HTTP_ADDR",
        None,
        &[
            ("SM_BOOTSTRAP_SERVERS", bootstrap()),
            ("SM_MYSQL_URL", database.clone()),
        ],
    );
    wait_healthy(&mut baseline, port, "db-scheduler");
    let mongo = std::env::var("SM_MONGODB_URI").expect("SM_MONGODB_URI (--test sets it)");
    let scheduler_port = free_port();
    let (mut messenger, port) = start_as_the_image(
        &config,
        "messenger",
        "messenger",
        "SM_MESSENGER_HTTP_ADDR",
        None,
        &[
            ("SM_BOOTSTRAP_SERVERS", bootstrap()),
            ("SM_MYSQL_URL", database),
            ("SM_MONGODB_URI", mongo),
            ("SM_MONGODB_DATABASE", unique("image").replace('-', "_")),
            ("SM_INGEST_TOPIC", names.ingest.clone()),
            ("SM_SMS_TOPIC", format!("{}-sms", names.ingest)),
            ("SM_STATUS_TOPIC", format!("{}-status", names.ingest)),
            ("SM_SENDERS_GROUP", names.group.clone()),
            (
                "SM_SCHEDULER_URL",
                format!("http://127.0.0.1:{scheduler_port}"),
            ),
        ],
    );
    wait_healthy(&mut messenger, port, "messenger");
    stops_cleanly(messenger, "messenger");
    stops_cleanly(baseline, "db-scheduler");
}
