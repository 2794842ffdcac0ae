//! The `db-scheduler` binary: parse the configuration, set up logging, poll until Ctrl-C/SIGTERM.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    scheduler::init_logging();
    db_scheduler::run(db_scheduler::Config::parse(), scheduler::shutdown_signal()).await?;
    Ok(())
}
