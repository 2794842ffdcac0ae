//! The `messenger` binary: `serve` (HTTP API, live page, senders), `run` (one experiment to the
//! end, with a progress bar, then the report) and `report` (a past run's report from MongoDB).
//! `run` and `report` exit with status 1 when any message was lost or early.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use messenger::{Connections, Experiment, Faults, Messenger, Report};

#[derive(Parser)]
#[command(
    name = "messenger",
    version,
    about = "The SMS simulation workload for the message scheduler"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    conn: Connections,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and the live page, with the senders running (runs start with POST /produce-messages).
    Serve {
        #[command(flatten)]
        experiment: Experiment,
    },
    /// Run one experiment to the end and print its report.
    Run {
        #[command(flatten)]
        experiment: Experiment,
        /// Also serve the HTTP API and live page while the run goes.
        #[arg(long)]
        serve: bool,
    },
    /// Print the report of a past run (the latest by default) from the audit store.
    Report {
        /// The run's id.
        #[arg(long)]
        run_id: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn print(report: &Report, json: bool) -> ! {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
    } else {
        print!("{}", report.table());
    }
    std::process::exit(if report.ok() { 0 } else { 1 })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    scheduler::init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { experiment } => {
            let m = Arc::new(Messenger::start(cli.conn, experiment).await?);
            messenger::serve(m, scheduler::shutdown_signal()).await?;
        }
        Command::Run { experiment, serve } => {
            experiment.validate()?;
            let m = Arc::new(Messenger::start(cli.conn, experiment.clone()).await?);
            if serve {
                tokio::spawn(messenger::serve(m.clone(), std::future::pending()));
            }
            let bar = progress_bar(experiment.count);
            let (progress, b) = (m.progress.clone(), bar.clone());
            let ticker = tokio::spawn(async move {
                loop {
                    b.set_position(progress.load(Ordering::Relaxed));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            let faults = Faults::default();
            let report = tokio::select! {
                r = m.run_experiment(&experiment, &faults) => r?,
                _ = scheduler::shutdown_signal() => anyhow::bail!("interrupted"),
            };
            ticker.abort();
            bar.finish_and_clear();
            print(&report, false);
        }
        Command::Report { run_id, json } => {
            let audit = messenger::audit::Audit::connect(
                cli.conn.mongodb_uri.expose(),
                &cli.conn.mongodb_database,
            )
            .await?;
            let report = messenger::report(&audit, run_id.as_deref()).await?;
            print(&report, json);
        }
    }
    Ok(())
}

/// A progress bar on a terminal; elsewhere a log line every 10 s.
fn progress_bar(count: u64) -> ProgressBar {
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(count);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} produced ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        let bar = ProgressBar::hidden();
        let b = bar.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                tracing::info!(produced = b.position(), of = count, "progress");
            }
        });
        bar
    }
}
