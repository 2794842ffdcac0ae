//! The README's figures, checked against what they describe: the default experiment's length
//! against `compose/experiment.env`, the Compose command against the script's own (its dry run),
//! the scheduler's flags, variables and defaults against its parser, and the Kafka classpath's
//! size against the one collected on this machine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::CommandFactory;
use regex::Regex;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).unwrap()
}

/// The README's prose with line breaks folded, so a sentence can be matched across them.
fn prose() -> String {
    readme().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The first capture of `pattern` in the README's prose.
fn said(pattern: &str) -> String {
    let text = prose();
    Regex::new(pattern)
        .unwrap()
        .captures(&text)
        .unwrap_or_else(|| panic!("the README says nothing matching {pattern}"))[1]
        .to_string()
}

/// A duration the README states ("1 hour", "30 s"), as the first capture of `pattern`.
fn said_duration(pattern: &str) -> Duration {
    duration(&said(pattern).replace(' ', ""))
}

fn experiment_env(key: &str) -> String {
    let env = std::fs::read_to_string(root().join("compose/experiment.env")).unwrap();
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("experiment.env sets {key}"))
        .to_string()
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// "about 2 hours": the default experiment sends for its duration, its last message is due up to
/// the longest delay later, and the messenger waits its grace period after that.
#[test]
fn the_readme_says_how_long_the_default_experiment_runs() {
    let sending = duration(&experiment_env("SM_EXP_DURATION"));
    let longest = duration(&experiment_env("SM_EXP_MAX_DELAY"));
    let shortest = duration(&experiment_env("SM_EXP_MIN_DELAY"));
    let grace = duration(&experiment_env("SM_EXP_GRACE"));
    let total = sending + longest + grace;
    let hours: u64 = said(r"The default experiment runs for about (\d+) hours")
        .parse()
        .unwrap();
    assert_eq!(
        hours,
        (total.as_secs_f64() / 3600.0).round() as u64,
        "{total:?}"
    );
    let count = said(r"it sends ([\d,]+) messages over").replace(',', "");
    assert_eq!(count, experiment_env("SM_EXP_COUNT"));
    assert_eq!(said_duration(r"messages over (\d+ hours?) "), sending);
    assert_eq!(said_duration(r"each due (\d+ s) to"), shortest);
    assert_eq!(
        said_duration(r"each due \d+ s to (\d+ hours?) after"),
        longest
    );
    assert_eq!(
        said_duration(r"and waits (\d+ s) \(`SM_EXP_GRACE`\)"),
        grace
    );
    // The short run's example: its own settings, the same sum.
    let example = said(r"For a short run: `([^`]*)`");
    let setting = |key: &str| {
        Regex::new(&format!(r"{key}=(\S+)"))
            .unwrap()
            .captures(&example)
            .map(|c| duration(&c[1]))
            .unwrap_or_else(|| duration(&experiment_env(key)))
    };
    let short = setting("SM_EXP_DURATION") + setting("SM_EXP_MAX_DELAY") + grace;
    let stated = said_duration(r"--exp` \((\d+ min(?: \d+ s)?)\)");
    assert_eq!(stated, short, "the short run's length");
}

/// The Compose command the README shows is the one `--exp` runs with Docker (its dry run), with
/// the checkout's path left out.
#[test]
fn the_readme_shows_the_compose_command_the_script_runs() {
    let out = Command::new("bash")
        .arg(root().join("messagescheduler.sh"))
        .args(["--dry-run", "--exp"])
        .env("SM_DOCKER", "1")
        .env("SM_STACK_DIR", std::env::temp_dir().join("readme-no-stack"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let prefix = format!("{}/", root().display());
    let ran = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("docker compose"))
        .expect("the dry run prints the compose command")
        .replace(&prefix, "")
        .trim()
        .to_string();
    let text = readme();
    let shown: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("docker compose"))
        .map(str::trim)
        .collect();
    assert_eq!(shown, [ran.as_str()]);
}

/// Each row of the Configuration table names the scheduler's flags, their variables and their
/// defaults as its parser has them. A default the README describes in words (computed from
/// another setting) is not compared; a literal one is.
#[test]
fn the_configuration_table_matches_the_schedulers_parser() {
    let command = scheduler::Config::command();
    let defaults = <scheduler::Config as clap::Parser>::try_parse_from(["scheduler"])
        .expect("the defaults parse");
    let effective = serde_json::to_value(
        scheduler::Settings::new(defaults)
            .expect("the defaults are valid")
            .view(),
    )
    .unwrap();
    let text = readme();
    let table = text
        .split("## Configuration")
        .nth(1)
        .expect("a Configuration section")
        .lines()
        .skip_while(|l| !l.starts_with("| flag"))
        .skip(2)
        .take_while(|l| l.starts_with('|'));
    let flag = Regex::new(r"`--([a-z-]+)`").unwrap();
    let var = Regex::new(r"`(SM_[A-Z_]+)`").unwrap();
    let literal = Regex::new(r"`([^`]+)`").unwrap();
    let mut compared = 0;
    for row in table {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (flags, vars, defaults) = (cells[1], cells[2], cells[3]);
        let flags: Vec<&str> = flag
            .captures_iter(flags)
            .map(|c| c.get(1).unwrap().as_str())
            .collect();
        let vars: Vec<&str> = var
            .captures_iter(vars)
            .map(|c| c.get(1).unwrap().as_str())
            .collect();
        let defaults: Vec<&str> = literal
            .captures_iter(defaults)
            .map(|c| c.get(1).unwrap().as_str())
            .collect();
        for (i, name) in flags.iter().enumerate() {
            let arg = command
                .get_arguments()
                .find(|a| a.get_long() == Some(name))
                .unwrap_or_else(|| panic!("the README names --{name}, which the scheduler lacks"));
            if let Some(var) = vars.get(i) {
                assert_eq!(
                    arg.get_env().and_then(|e| e.to_str()),
                    Some(*var),
                    "--{name}'s variable"
                );
            }
            let parsed: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            match defaults.get(i) {
                Some(stated) if defaults.len() == flags.len() && !stated.contains('<') => {
                    if parsed.is_empty() {
                        // Computed from other settings: the effective value, as /api/config
                        // shows it with every setting at its default.
                        assert_eq!(
                            effective[name.replace('-', "_")].to_string(),
                            *stated,
                            "--{name}'s effective default"
                        );
                    } else {
                        assert_eq!(parsed, [*stated], "--{name}'s default");
                    }
                    compared += 1;
                }
                _ => {}
            }
        }
    }
    assert!(
        compared >= 15,
        "only {compared} defaults compared: the table's layout changed"
    );
}

/// "45 jars, 43 MiB": the classpath the script collected (`SM_KAFKA_HOME`, which `--test`
/// exports) has as many jars, and as many MiB to the nearest one.
#[test]
fn the_readme_states_the_kafka_classpaths_size() {
    let home = std::env::var("SM_KAFKA_HOME").expect("SM_KAFKA_HOME (--test exports it)");
    let jars: Vec<u64> = std::fs::read_dir(Path::new(&home).join("libs"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().extension().is_some_and(|x| x == "jar"))
        .map(|e| e.metadata().unwrap().len())
        .collect();
    let text = prose();
    let stated = Regex::new(r"Maven Central \((\d+) jars, (\d+) MiB")
        .unwrap()
        .captures(&text)
        .expect("the README states the classpath's size");
    assert_eq!(stated[1].parse::<usize>().unwrap(), jars.len());
    let mib = jars.iter().sum::<u64>() as f64 / (1 << 20) as f64;
    assert_eq!(
        stated[2].parse::<u64>().unwrap(),
        mib.round() as u64,
        "{mib}"
    );
}
