//! The `collab-engine` binary: parse the configuration, start the server, print the bound
//! address, wait for SIGINT or SIGTERM, shut down gracefully. `collab-engine copy ...` moves
//! documents between the disk backend and PostgreSQL instead (`collab_engine::copy`).

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use collab_engine::config::Config;

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("copy") {
        return copy();
    }
    let config = Config::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Register before starting, so a signal that arrives early is not lost.
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let server = collab_engine::server::start(config)?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on http://{}", server.local_addr()).context("writing to stdout")?;
    stdout.flush().context("flushing stdout")?;
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal}: shutting down");
    }
    server.shutdown()
}

/// `collab-engine copy ...`: see `collab_engine::copy`.
fn copy() -> anyhow::Result<()> {
    let args = collab_engine::copy::CopyArgs::parse_from(std::env::args().skip(1));
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let report = collab_engine::copy::run(&args)?;
    println!(
        "copied and verified {} documents ({} snapshots, {} op records)",
        report.docs, report.snapshots, report.ops
    );
    Ok(())
}
