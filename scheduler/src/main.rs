//! The `scheduler` binary: parse the configuration, set up logging, run until Ctrl-C or SIGTERM.

use clap::Parser;
use scheduler::{Config, Settings};

fn main() -> anyhow::Result<()> {
    // Before any thread starts: the allocator's arenas are chosen per thread.
    scheduler::tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        scheduler::init_logging();
        let settings = Settings::new(Config::parse())?;
        scheduler::run(settings, scheduler::shutdown_signal()).await?;
        Ok(())
    });
    // A broker round trip still running on the blocking pool must not hold the exit up: the
    // stop has already committed what is safe.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
