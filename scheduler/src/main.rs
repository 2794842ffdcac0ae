//! The `scheduler` binary: parse the configuration, set up logging, run until Ctrl-C or SIGTERM.

use clap::Parser;
use scheduler::{Config, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    scheduler::init_logging();
    let settings = Settings::new(Config::parse())?;
    scheduler::run(settings, scheduler::shutdown_signal()).await?;
    Ok(())
}
