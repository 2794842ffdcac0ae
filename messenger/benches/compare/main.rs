//! `cargo bench -p messenger --bench compare [-- --help]`
//!
//! The figures that tell users why to choose this service, side by side on one machine: the Kafka
//! scheduler's throughput beside a plain relay, its lateness at fixed rates beside the MySQL
//! baseline, its memory with a million records pending, a burst due in one instant, and recovery
//! from a killed scheduler and a restarted broker. The services run as release binaries in child
//! processes; each section gets a broker of its own. Prints the tables and writes BENCHMARKS.md
//! with the machine and the exact command.

mod goals;
mod harness;
mod sections;

use std::fmt::Write as _;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use harness::{Outcome, Percentiles};
use sections::Fault;

#[derive(Parser, Debug)]
#[command(
    bin_name = "cargo bench -p messenger --bench compare --",
    about = "Benchmarks the Kafka scheduler beside a relay and the MySQL baseline"
)]
struct Args {
    /// Records for the throughput comparison (already due when the scheduler starts).
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Rounds of the throughput comparison: each path runs this many times on a fresh broker,
    /// alternating which goes first, and the medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Rates of due records per second for the precision runs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    rates: Vec<usize>,
    /// Rates (records/s) of the steps that find the highest rate whose p99 stays within 1.5× the
    /// broker alone's (Kafka only; rates also in `--rates` are measured once).
    #[arg(long, value_delimiter = ',', default_value = "2000,5000,10000,20000")]
    step_rates: Vec<usize>,
    /// Seconds of producing at each rate.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Delay from produce to due, for the precision and recovery runs.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Records pending (due one to two hours later) for the memory figure.
    #[arg(long, default_value_t = 1_000_000)]
    pending: usize,
    /// Records due in the same millisecond for the burst.
    #[arg(long, default_value_t = 100_000)]
    burst: usize,
    /// Also measure memory with every pending record carrying an `id` (and the index's rebuild):
    /// this doubles the section's time.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    memory_with_ids: bool,
    /// Records of the past-due backlog for the memory-under-load figure.
    #[arg(long, default_value_t = 200_000)]
    backlog: usize,
    /// Bytes per value of the backlog's records.
    #[arg(long, default_value_t = 1024)]
    backlog_bytes: usize,
    /// Records of the large same-instant burst for the memory-under-load figure.
    #[arg(long, default_value_t = 100_000)]
    large_burst: usize,
    /// Bytes per value of the large burst's records.
    #[arg(long, default_value_t = 10_240)]
    large_burst_bytes: usize,
    /// Rate of the recovery runs (records per second).
    #[arg(long, default_value_t = 1_000)]
    recovery_rate: usize,
    /// Seconds of producing in the recovery runs; the fault comes halfway.
    #[arg(long, default_value_t = 20)]
    recovery_seconds: u64,
    /// Rates (records/s) of the ordinary client (Python's confluent-kafka, default settings).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    client_rates: Vec<usize>,
    /// Records per second of the ordinary client in the isolation runs (ten targets).
    #[arg(long, default_value_t = 2_000)]
    isolation_rate: usize,
    /// Seconds of each isolation run; the target is deleted a third of the way in.
    #[arg(long, default_value_t = 30)]
    isolation_seconds: u64,
    /// Clean stops (SIGTERM) under full load.
    #[arg(long, default_value_t = 20)]
    stop_tries: usize,
    /// Records produced at once before each stop, due over the next 3 s.
    #[arg(long, default_value_t = 20_000)]
    stop_records: usize,
    /// Rates (records/s) of the ordinary client in the delivery modes' comparison.
    #[arg(long, value_delimiter = ',', default_value = "2000,10000")]
    mode_rates: Vec<usize>,
    /// Run only these sections (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<Section>,
    /// Where to write the tables (default: BENCHMARKS.md when every section runs, else nowhere).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: run as the relay process (bootstrap, from, to, count).
    #[arg(long, hide = true, num_args = 4)]
    relay: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    Client,
    Throughput,
    Precision,
    Steps,
    Memory,
    Burst,
    Pressure,
    Recovery,
    Isolation,
    Stops,
    Delivery,
}

impl Args {
    fn runs(&self, s: Section) -> bool {
        self.only.is_empty() || self.only.contains(&s)
    }

    /// The command that reproduces this run.
    fn command(&self) -> String {
        let rates: Vec<String> = self.rates.iter().map(ToString::to_string).collect();
        let client: Vec<String> = self.client_rates.iter().map(ToString::to_string).collect();
        let steps: Vec<String> = self.step_rates.iter().map(ToString::to_string).collect();
        let mut c = format!(
            "cargo bench -p messenger --bench compare -- --client-rates {} --messages {} --rounds {} --rates {} --step-rates {} --seconds {} --delay {} --pending {} --burst {} --backlog {} --backlog-bytes {} --large-burst {} --large-burst-bytes {} --recovery-rate {} --recovery-seconds {}",
            client.join(","),
            self.messages,
            self.rounds,
            rates.join(","),
            steps.join(","),
            self.seconds,
            humantime::format_duration(self.delay),
            self.pending,
            self.burst,
            self.backlog,
            self.backlog_bytes,
            self.large_burst,
            self.large_burst_bytes,
            self.recovery_rate,
            self.recovery_seconds
        );
        let _ = write!(
            c,
            " --isolation-rate {} --isolation-seconds {} --stop-tries {} --stop-records {} --mode-rates {}",
            self.isolation_rate,
            self.isolation_seconds,
            self.stop_tries,
            self.stop_records,
            self.mode_rates
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        if !self.only.is_empty() {
            let only: Vec<String> = self
                .only
                .iter()
                .map(|s| format!("{s:?}").to_lowercase())
                .collect();
            let _ = write!(c, " --only {}", only.join(","));
        }
        c
    }
}

const HEADER: &str = "| path | p50 ms | p99 ms | p99.9 ms | max ms | early | missing | duplicates |\n| --- | --- | --- | --- | --- | --- | --- | --- |";

fn row(name: &str, p: &Percentiles, o: &Outcome) -> String {
    format!(
        "| {name} | {} | {} | {} | {} | {} | {} | {} |",
        p.p50, p.p99, p.p999, p.max, o.early, o.missing, o.duplicates
    )
}

/// Prints a section as soon as it is measured, and keeps it for the file.
fn emit(out: &mut String, text: &str) {
    println!("{text}");
    out.push_str(text);
    out.push('\n');
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!("{cores} cores ({cpu}), {mem_gib:.0} GiB")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut a = Args::parse();
    if let [bootstrap, from, to, n] = a.relay.as_slice() {
        let n = n.parse().expect("a count");
        return sections::relay_main(bootstrap, from, to, n).await;
    }
    // `cargo test --all-targets` runs this binary too, without `--bench`: then every section runs
    // once at a tiny size, as a test of the benchmark itself, and nothing is written.
    let smoke = !a.bench;
    if smoke {
        a = Args {
            messages: 500,
            rounds: 2,
            client_rates: vec![100],
            rates: vec![200],
            step_rates: vec![200, 400],
            seconds: 2,
            pending: 2_000,
            burst: 1_000,
            backlog: 1_000,
            large_burst: 200,
            recovery_rate: 200,
            recovery_seconds: 4,
            isolation_rate: 200,
            isolation_seconds: 6,
            stop_tries: 2,
            stop_records: 1_000,
            mode_rates: vec![100],
            out: None,
            ..a
        };
    }
    harness::note("building the services");
    let bins = harness::build(!smoke);
    let mut outcomes: Vec<(String, Outcome)> = Vec::new();
    let mut goals = goals::Goals::default();
    let mut out = String::new();
    emit(
        &mut out,
        &format!(
            "# Benchmarks\n\nCommand (after `./messagescheduler.sh --stack`, which collects Apache Kafka and starts MariaDB):\n\n    {}\n\nMachine: {}. Every section starts a broker of its own: Apache Kafka {} (one JVM in KRaft mode, broker and controller, 512 MiB heap, `broker/server.properties`) on 127.0.0.1. MySQL: MariaDB 10.11. The scheduler and the db-scheduler run as release binaries in their own processes with their default settings (ladder 250 ms × 4 up to 1 day, level-1 windows of 1 s, hold horizon 6 s, safety margin 100 ms, sweep lead 2); producers and readers run in the benchmark's process. Lateness is measured on arrival at a reader, against the due time; \"early\" counts records published or received before their due time.\n",
            a.command(),
            machine(),
            scheduler::testkit::kafka_version()
        ),
    );

    if a.runs(Section::Client) {
        let mut text = format!(
            "## 0. An ordinary client: Python confluent-kafka, default settings, {} s at a steady rate, due {} later\n\nThe same producer and reader, on one fresh broker: to a plain topic with nothing else running (*broker alone*), through a one-hop relay (consume, produce with idempotence and `acks=all`), and to `SCHEDULED_MESSAGES` with the scheduler running beside it. *Achieved* is the producer's acknowledged rate ÷ the rate it offered; lateness is on arrival at the reader (after the produce for the first two, after the due time for the scheduler). Ratios are against the broker alone.\n\n| rate/s | path | achieved | p50 ms | p99 ms | p99.9 ms | max ms | p99 ÷ alone | early | missing | dups | broker CPU s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            a.seconds,
            humantime::format_duration(a.delay)
        );
        for &rate in &a.client_rates {
            let c = sections::ordinary_client(&bins, rate, a.seconds, a.delay).await;
            let floor = c.alone.p99_ms.unwrap_or(f64::NAN);
            for (name, f) in [
                ("broker alone", &c.alone),
                ("relay", &c.relay),
                ("scheduler", &c.scheduler),
            ] {
                let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
                let _ = write!(
                    text,
                    "\n| {} | {name} | {:.2} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {} |",
                    c.rate,
                    f.achieved_ratio,
                    ms(f.p50_ms),
                    ms(f.p99_ms),
                    ms(f.p999_ms),
                    ms(f.max_ms),
                    f.p99_ms.unwrap_or(f64::NAN) / floor,
                    f.early,
                    f.missing,
                    f.duplicates,
                    f.broker_cpu_s
                        .map_or("-".to_string(), |v| format!("{v:.1}")),
                );
            }
            goals.client = Some((
                c.rate,
                c.scheduler.achieved_ratio,
                c.scheduler.p99_ms.unwrap_or(f64::NAN),
                floor,
            ));
            outcomes.push((
                format!("ordinary client at {rate}/s"),
                Outcome {
                    early: c.scheduler.early,
                    missing: c.scheduler.missing + c.relay.missing + c.alone.missing,
                    ..Outcome::default()
                },
            ));
        }
        emit(&mut out, &format!("{text}\n"));
    }
    if a.runs(Section::Throughput) {
        let t = sections::throughput(&bins, a.messages, a.rounds).await;
        let (relay, ours, ratio) = t.medians();
        goals.throughput = Some((ours, relay, ratio));
        let mut text = format!(
            "## 1. Throughput: {} records already due\n\nDelivery rate from the first to the last arrival at the target, for the Kafka scheduler (ingest → target) and a plain consume-and-produce relay of the same records with the scheduler's producer settings. Each path runs {} times, each time on a fresh broker, alternating which goes first; the ratio is the median of the rounds' ratios. *With ids*: the scheduler once more, every record with an `id` header (a fact written at ingest and at delivery, the index checked before each publish).\n\n| round | relay records/s | scheduler records/s | ratio |\n| --- | --- | --- | --- |",
            a.messages,
            t.rounds.len()
        );
        for (i, (r, s)) in t.rounds.iter().enumerate() {
            let _ = write!(text, "\n| {} | {r:.0} | {s:.0} | {:.2} |", i + 1, s / r);
        }
        let missing: usize = t.scheduler_outcomes.iter().map(|o| o.missing).sum();
        let early: usize = t.scheduler_outcomes.iter().map(|o| o.early).sum();
        let _ = write!(
            text,
            "\n| median | {relay:.0} | {ours:.0} | {ratio:.2} |\n\nRecords with ids: {:.0}/s, {:.2} of the median without. Scheduler: {missing} missing, {early} early; with ids: {} missing, {} early.\n",
            t.with_ids.rate(),
            t.with_ids.rate() / ours,
            t.with_ids.missing,
            t.with_ids.early
        );
        emit(&mut out, &text);
        outcomes.extend(
            t.scheduler_outcomes
                .iter()
                .map(|o| ("throughput".to_string(), *o)),
        );
        outcomes.push(("throughput with ids".into(), t.with_ids));
    }
    // The p99s of every precision run, for the steps.
    let mut p99s: Vec<sections::Step> = Vec::new();
    if a.runs(Section::Precision) {
        for &rate in &a.rates {
            let p = sections::precision(&bins, rate, a.seconds, a.delay, true).await;
            p99s.push(p.p99s());
            if rate == 1_000 {
                goals.publish_1000 = p.scheduler().map(|o| o.publish);
            }
            let mut text = format!(
                "## 2. Precision at {} due records per second ({} s, {} records)\n\nKafka: each record due {} after it is produced. MySQL: the same number of rows, falling due at the same rate.\n\n{HEADER}",
                p.rate,
                a.seconds,
                p.rate * a.seconds as usize,
                humantime::format_duration(a.delay)
            );
            outcomes.extend(p.rows.iter().map(|(n, o)| (format!("{n} at {rate}/s"), *o)));
            for (name, o) in &p.rows {
                let _ = write!(
                    text,
                    "\n{}",
                    row(&format!("{name}, on arrival"), &o.arrival, o)
                );
                if name.starts_with("kafka") {
                    let _ = write!(
                        text,
                        "\n{}",
                        row(&format!("{name}, at publish"), &o.publish, o)
                    );
                }
            }
            let _ = write!(
                text,
                "\n\nThe scheduler's own histogram: p99 of acknowledgement by the broker minus due time {}.",
                acked(p.acked_p99_ms)
            );
            emit(&mut out, &format!("{text}\n"));
        }
    }
    if a.runs(Section::Steps) {
        let mut text = format!(
            "## 2b. Steps: records due {} ahead, {} s at each rate

The tuned producer of section 2, Kafka only (rates also in section 2 are its runs). *Within* is the scheduler's on-arrival p99 ≤ 1.5 × the broker alone's + 50 ms. *Relay* is a one-hop consume-and-produce relay of records produced at the same rate to a plain topic, on the same broker: the floor of any Kafka-backed scheduler's single hop. *Acknowledged* is the scheduler's own p99 of acknowledgement minus due time (its histogram's bucket bound): far below the on-arrival p99, the time was spent getting the records out of the broker to the reader, not into it. *CPU s* is the CPU time the scheduler process used from the first record produced to the last read, and the relay process over its life (the same span, give or take its start-up).

| rate/s | broker alone p99 ms | scheduler p99 ms | ÷ | within | relay p99 ms | relay within | scheduler acknowledged p99 | CPU s, scheduler / relay |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            humantime::format_duration(a.delay),
            a.seconds
        );
        for &rate in &a.step_rates {
            let step = match p99s.iter().find(|s| s.rate == rate) {
                Some(&step) => step,
                None => {
                    let p = sections::precision(&bins, rate, a.seconds, a.delay, false).await;
                    outcomes.extend(p.rows.iter().map(|(n, o)| (format!("{n} at {rate}/s"), *o)));
                    p.p99s()
                }
            };
            let (alone, ours, relay) = (step.alone, step.ours, step.relay);
            goals.steps.push((rate, alone, ours, relay));
            let yes_no = |p99: i64| {
                if goals::within(p99 as f64, alone as f64) {
                    "yes"
                } else {
                    "no"
                }
            };
            let _ = write!(
                text,
                "\n| {rate} | {alone} | {ours} | {:.2} | {} | {relay} | {} | {} | {:.1} / {:.1} |",
                ours as f64 / alone.max(1) as f64,
                yes_no(ours),
                yes_no(relay),
                acked(step.acked),
                step.ours_cpu_s,
                step.relay_cpu_s
            );
        }
        let (ours, relay, broker) = goals.step_limits();
        let _ = write!(
            text,
            "\n\nHighest rate within: scheduler {ours}/s, relay {relay}/s; highest rate at which the broker alone keeps p99 ≤ 1 s: {broker}/s.\n"
        );
        emit(&mut out, &text);
    }
    if a.runs(Section::Memory) {
        let m = sections::memory(&bins, a.pending, false).await;
        let i = if a.memory_with_ids {
            sections::memory(&bins, a.pending, true).await
        } else {
            sections::Memory::not_measured(a.pending)
        };
        let (rebuild_s, rebuilt_mib) = i.rebuild.unwrap_or_default();
        goals.filing = Some((m.filing_rate(), m.broker_produce_rate, m.relay_filing_rate));
        goals.pending_mib = Some((m.pending, m.pending_mib));
        goals.restart_s = m.restart.as_ref().map(|r| r.first_on_time_s);
        if let Some(r) = &m.restart {
            outcomes.push(("restart with records pending".into(), r.outcome));
        }
        emit(&mut out, &format!(
            "## 3. Memory: {} records pending, due one to two hours later\n\n*With ids*: the same on a broker of its own, every record with an `id` header; then the scheduler is stopped, its index of ids deleted, and started again: *rebuilt* is until the index is fresh (every fact read back from the state topic).\n\n| state | without ids, resident MiB | with ids, resident MiB |\n| --- | --- | --- |\n| idle (assigned, nothing pending) | {:.0} | {} |\n| {} pending, all filed in slices | {:.0} | {} |\n| peak while filing them | {:.0} | {} |\n| after rebuilding the index | - | {} |\n\nWithout ids: produced in {:.0} s; all filed in slices {:.0} s after the first was produced ({:.0} records/s). {} The broker alone took the same kind of records from one producer at {:.0} records/s (filing ÷ that: {:.2}); a one-hop relay beside that producer, reading what it wrote, copied them at {:.0} records/s (filing ÷ that: {:.2}).\n\n{}",
            m.pending, m.idle_mib, mib(i.idle_mib), m.pending, m.pending_mib, mib(i.pending_mib), m.peak_mib, mib(i.peak_mib), mib(if i.rebuild.is_some() { rebuilt_mib } else { f64::NAN }),
            m.produce_s, m.placed_s, m.filing_rate(),
            if i.produce_s.is_nan() {
                "With ids: not measured (`--memory-with-ids false`).".to_string()
            } else {
                format!(
                    "With ids: produced in {:.0} s, filed after {:.0} s ({:.0} records/s); index of {} ids rebuilt in {:.1} s.",
                    i.produce_s, i.placed_s, i.filing_rate(), i.pending, rebuild_s
                )
            },
            m.broker_produce_rate, m.filing_rate() / m.broker_produce_rate,
            m.relay_filing_rate, m.filing_rate() / m.relay_filing_rate,
            m.restart.as_ref().map_or(String::new(), |r| format!(
                "Restarted (without ids) with the {} records pending, and {} records due every 20 ms from its start: first on-time delivery (published within {} ms of its due time) {:.1} s after the new process was spawned; those records at publish p50 {} ms, p99 {} ms, max {} ms; {} missing, {} early.\n",
                m.pending, r.outcome.expected, sections::ON_TIME_MS, r.first_on_time_s,
                r.outcome.publish.p50, r.outcome.publish.p99, r.outcome.publish.max,
                r.outcome.missing, r.outcome.early
            ))
        ));
    }
    if a.runs(Section::Burst) {
        let b = sections::burst(&bins, a.burst).await;
        outcomes.push(("burst".into(), b.outcome));
        goals.burst = Some((b.n, b.last_ms, b.accept_ms));
        emit(&mut out, &format!(
            "## 4. Burst: {} records due in the same millisecond\n\n| broker took them from one producer in | last delivered after the instant | delivered/s | p50 ms | p99 ms | p99.9 ms | max ms | early | missing | duplicates |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n| {} ms | {} ms | {:.0} | {} | {} | {} | {} | {} | {} | {} |\n",
            b.n, b.accept_ms, b.last_ms, b.outcome.rate(), b.outcome.arrival.p50, b.outcome.arrival.p99, b.outcome.arrival.p999, b.outcome.arrival.max, b.outcome.early, b.outcome.missing, b.outcome.duplicates
        ));
    }
    if a.runs(Section::Pressure) {
        let backlog = sections::backlog(&bins, a.backlog, a.backlog_bytes).await;
        let burst = sections::large_burst(&bins, a.large_burst, a.large_burst_bytes).await;
        let mut text = String::from("## 4b. Memory under load, with the default memory budget (32 MiB)\n\nPeak resident memory of the scheduler process (VmHWM) over the whole run. *Backlog*: records already past due, produced while no scheduler ran (an outage), then read in at the scheduler's start; drain is from its start to the last delivery. *Burst*: records due in one instant, produced ahead of time while the scheduler runs; drain is from the instant to the last delivery.\n\n| load | records | value bytes | peak resident MiB | drain s | delivered/s | early | missing | duplicates |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for (name, p) in [
            ("backlog, past due", &backlog),
            ("burst, one instant", &burst),
        ] {
            let _ = writeln!(
                text,
                "| {name} | {} | {} | {:.0} | {:.1} | {:.0} | {} | {} | {} |",
                p.n,
                p.bytes,
                p.peak_mib,
                p.drain_s,
                p.outcome.rate(),
                p.outcome.early,
                p.outcome.missing,
                p.outcome.duplicates
            );
            outcomes.push((name.to_string(), p.outcome));
        }
        emit(&mut out, &format!("{text}\n"));
    }
    if a.runs(Section::Recovery) {
        let mut text = format!(
            "## 5. Recovery: {} records per second for {} s, each due {} later; the fault halfway\n\n| fault | down | lost | duplicated | early | deliveries resume after the fault | lateness p50 ms | p99 ms | max ms |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            a.recovery_rate, a.recovery_seconds, humantime::format_duration(a.delay)
        );
        for fault in [
            Fault::KillScheduler,
            Fault::KillOneOfTwo { restart: true },
            Fault::KillOneOfTwo { restart: false },
            Fault::RestartBroker,
        ] {
            let r = sections::recovery(&bins, fault, a.recovery_rate, a.recovery_seconds, a.delay)
                .await;
            outcomes.push((r.what.into(), r.outcome));
            let o = &r.outcome;
            let _ = write!(
                text,
                "\n| {} | {:.1} s | {} | {} | {} | {} | {} | {} | {} |",
                r.what,
                r.down_s,
                o.missing,
                o.duplicates,
                o.early,
                if r.resumed_s.is_nan() {
                    "-".to_string()
                } else {
                    format!("{:.1} s", r.resumed_s)
                },
                o.arrival.p50,
                o.arrival.p99,
                o.arrival.max
            );
        }
        emit(&mut out, &format!("{text}\n"));
    }
    if a.runs(Section::Isolation) {
        let iso = sections::isolation(&bins, a.isolation_rate, a.isolation_seconds).await;
        let v = |j: &serde_json::Value, k: &str| match &j[k] {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::Number(n) => format!("{:.0}", n.as_f64().unwrap_or(f64::NAN)),
            other => other.to_string(),
        };
        let ratio = iso.deleted["healthy_p99"].as_f64().unwrap_or(f64::NAN)
            / iso.baseline["healthy_p99"].as_f64().unwrap_or(f64::NAN);
        let mut text = format!(
            "## 6. One target deleted mid-run: an ordinary client at {}/s to ten targets, {} s, due 2 s later

A broker that does not create topics on demand (`auto.create.topics.enable=false`, as operators run Kafka; the stack's broker would create the deleted target again at the next write). The first target is deleted a third of the way in. *Healthy* is the nine other targets (all ten in the run without a fault); lateness is on arrival, against the due time. *Named* is how long after the deletion `/healthz` first named the deleted topic.

| run | achieved/s | healthy p50 ms | p99 ms | max ms | missing | early | deleted target: records | delivered | dead-lettered | missing | named after |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            a.isolation_rate, a.isolation_seconds
        );
        for (name, j) in [
            ("no fault", &iso.baseline),
            ("one target deleted", &iso.deleted),
        ] {
            let _ = write!(
                text,
                "\n| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                v(j, "achieved"),
                v(j, "healthy_p50"),
                v(j, "healthy_p99"),
                v(j, "healthy_max"),
                v(j, "healthy_missing"),
                v(j, "healthy_early"),
                v(j, "dead_records"),
                v(j, "dead_delivered"),
                j["dead_dlq"],
                v(j, "dead_missing"),
                j["named_after_s"]
                    .as_f64()
                    .map_or("-".into(), |s| format!("{s:.1} s")),
            );
        }
        let _ = write!(
            text,
            "\n\nThe nine healthy targets' p99 with the fault ÷ without: {ratio:.2}.\n"
        );
        emit(&mut out, &text);
        for j in [&iso.baseline, &iso.deleted] {
            outcomes.push((
                "isolation".into(),
                Outcome {
                    early: j["healthy_early"].as_u64().unwrap_or(0) as usize,
                    missing: (j["healthy_missing"].as_u64().unwrap_or(0)
                        + j["dead_missing"].as_u64().unwrap_or(0))
                        as usize,
                    ..Outcome::default()
                },
            ));
        }
    }
    if a.runs(Section::Delivery) {
        let mut text = format!(
            "## 10. The delivery modes side by side: at-least-once and exactly-once (`--delivery`)\n\nOn one fresh broker per rate: the ordinary client (section 0) to a plain topic (*broker alone*), then through a scheduler in each mode, one after the other (the order alternates between rates). The reader is the client's, with confluent-kafka's default `isolation.level=read_committed`. *At publish* is the scheduler's own p99 of acknowledgement minus due time (its histogram's bucket bound); in the exactly-once mode a record is acknowledged inside its transaction and visible only once that commits (every `--commit-interval`, 100 ms). *CPU ms/1k* is the scheduler's CPU per thousand records; *commit p99* the exactly-once mode's p99 of a transaction's commit, during which no new send starts. Then the burst of section 4 ({} records due in one instant) in each mode.\n\n| rate/s | mode | achieved | at publish p99 ms | on arrival p50 ms | p99 ms | max ms | p99 ÷ alone | early | missing | dups | CPU ms/1k | commit p99 ms |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            a.burst
        );
        for (i, &rate) in a.mode_rates.iter().enumerate() {
            let modes = if i % 2 == 0 {
                ["at-least-once", "exactly-once"]
            } else {
                ["exactly-once", "at-least-once"]
            };
            let (alone, runs) =
                sections::delivery_modes(&bins, rate, a.seconds, a.delay, &modes).await;
            let floor = alone.p99_ms.unwrap_or(f64::NAN);
            let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
            let _ = write!(
                text,
                "\n| {rate} | broker alone | {:.2} | - | {} | {} | {} | 1.00 | {} | {} | {} | - | - |",
                alone.achieved_ratio,
                ms(alone.p50_ms),
                ms(alone.p99_ms),
                ms(alone.max_ms),
                alone.early,
                alone.missing,
                alone.duplicates
            );
            for r in &runs {
                let c = &r.client;
                let records = (rate as f64 * a.seconds as f64).max(1.0);
                let _ = write!(
                    text,
                    "\n| {rate} | {} | {:.2} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {:.0} | {} |",
                    r.mode,
                    c.achieved_ratio,
                    ms(r.publish_p99_ms),
                    ms(c.p50_ms),
                    ms(c.p99_ms),
                    ms(c.max_ms),
                    c.p99_ms.unwrap_or(f64::NAN) / floor,
                    c.early,
                    c.missing,
                    c.duplicates,
                    r.cpu_s * 1000.0 / records * 1000.0,
                    ms(r.commit_p99_ms)
                );
                outcomes.push((
                    format!("{} at {rate}/s", r.mode),
                    Outcome {
                        early: c.early,
                        missing: c.missing,
                        ..Outcome::default()
                    },
                ));
            }
        }
        text.push_str("\n\n| burst, mode | last delivered after the instant | delivered/s | p99 ms | early | missing | duplicates |\n| --- | --- | --- | --- | --- | --- | --- |");
        // `--burst 0` leaves the bursts out (the A/B runs of --commit-interval); so does the
        // smoke run, whose section 4 runs the same burst code.
        let modes: &[&str] = if a.burst > 0 && !smoke {
            &["at-least-once", "exactly-once"]
        } else {
            &[]
        };
        for &mode in modes {
            let b = sections::burst_with(&bins, a.burst, &["--delivery", mode]).await;
            let _ = write!(
                text,
                "\n| {mode} | {} ms | {:.0} | {} | {} | {} | {} |",
                b.last_ms,
                b.outcome.rate(),
                b.outcome.arrival.p99,
                b.outcome.early,
                b.outcome.missing,
                b.outcome.duplicates
            );
            outcomes.push((format!("burst, {mode}"), b.outcome));
        }
        emit(&mut out, &format!("{text}\n"));
    }
    if a.runs(Section::Stops) {
        let s = sections::stops(&bins, a.stop_tries, a.stop_records).await;
        let mut times = s.exit_s.clone();
        times.sort_by(f64::total_cmp);
        let o = &s.outcome;
        let text = format!(
            "## 7. Clean stops under full load: {} tries

Each try starts a scheduler, produces {} records due over the next 3 s at once, and sends SIGTERM 1 s later, while it delivers at full speed; the time to its exit is measured (the shutdown timeout is {:.0} s). A last scheduler then delivers what is left.

| tries | exit s: min | median | max | exited 0 | lost | duplicated | early |
| --- | --- | --- | --- | --- | --- | --- | --- |
| {} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |
",
            s.exit_s.len(),
            a.stop_records,
            s.timeout_s,
            s.exit_s.len(),
            times.first().copied().unwrap_or(f64::NAN),
            sections::median(times.clone()),
            times.last().copied().unwrap_or(f64::NAN),
            s.clean,
            o.missing,
            o.duplicates,
            o.early,
        );
        emit(&mut out, &text);
        outcomes.push(("stops".into(), s.outcome));
    }
    emit(&mut out, LIMITS);
    goals.early = outcomes.iter().map(|(_, o)| o.early).sum();
    goals.missing = outcomes.iter().map(|(_, o)| o.missing).sum();
    let table = goals.table();
    println!("{table}");
    // The goals open the file, after the command and the machine.
    let at = out.find("\n## ").map_or(out.len(), |i| i + 1);
    out.insert_str(at, &format!("{table}\n"));

    let path = a.out.clone().or_else(|| {
        (a.only.is_empty() && !smoke)
            .then(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md").into())
    });
    if let Some(path) = path {
        std::fs::write(&path, &out).expect("write the tables");
        eprintln!("written to {}", path.display());
    }
    // Whatever the figures, the invariants hold: nothing lost, nothing early.
    let broken: Vec<String> = outcomes
        .iter()
        .filter(|(_, o)| o.missing > 0 || o.early > 0)
        .map(|(name, o)| format!("{name}: {} missing, {} early", o.missing, o.early))
        .collect();
    assert!(broken.is_empty(), "invariants broken: {broken:?}");
}

/// What limits each figure, as far as this machine showed.
const LIMITS: &str = "## What limits these figures

- **Two cores for everything.** The broker (a JVM), MariaDB, the scheduler or the db-scheduler,
  and the benchmark's producers and readers share them; every figure is a floor for this machine,
  not for the design.
- **One broker, no replication.** `acks=all` is one local append to the page cache (Kafka does not
  fsync per write); durability beyond a process crash needs the replicas a one-node broker does
  not have. Each section starts a fresh broker, so its JIT is cold for the first seconds.
- **On arrival vs at publish.** On arrival includes the reader's fetch from the broker; *at
  publish* (the record's timestamp, set when the scheduler produced it, minus the due time) is the
  scheduler's own lateness.
- **Throughput (1)** is the rate at which records already due leave the ingest topic for their
  target: the same single hop the relay makes, with the same consumer and producer settings
  (idempotent, `acks=all`).
- **Precision (2)**: records due 5 s after they are produced are within the hold horizon (6 s):
  they wait in memory from ingest and take one hop. The MySQL baseline is bounded by its poll
  interval, as expected.
- **Memory (3)**: nothing pending is held in memory; the records are in the slice topics. The
  resident set is the working set of filing records at full speed (sends in flight within the
  memory budget, librdkafka's queues, capped prefetch), which the allocator gives back once quiet.
- **Burst (4)**: the burst sits in one slice window; its sweep moves what it reads in time into
  a finer window and the rest straight into the timer, which holds what the memory budget admits;
  records read after their due time count in `sm_timer_late_total`.
- **Recovery (5)**: after `kill -9` the scheduler is restarted at once with the same
  `--instance-id` (static membership); *resume* is the first record the new process published.
  Duplicates are the records delivered after the last commit point. After the broker's restart
  (a JVM start and log recovery of every partition it holds), *resume* is the first record a
  reader saw after it came back. With two instances, the other keeps delivering throughout: the
  figure is the worst lateness, the records of the killed one's partitions (its own again after
  a restart under the same member id; the other's once the broker's session timeout has passed
  and the group has rebalanced, when it is not restarted).
";

/// MiB to the nearest one, or "-" for a figure not measured (NaN).
fn mib(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.0}")
    }
}

/// A histogram bucket bound in ms, as "≤ X ms" ("n/a" without observations).
fn acked(ms: Option<f64>) -> String {
    match ms {
        Some(ms) if ms.is_finite() => format!("≤ {ms:.0} ms"),
        Some(_) => "> 120 s".into(),
        None => "n/a".into(),
    }
}
