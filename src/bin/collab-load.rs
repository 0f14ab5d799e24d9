//! `collab-load`: drives many WebSocket clients against collab-engine and reports latency
//! percentiles (see `collab-load --help` and docs/benchmarks.md).

use anyhow::Context as _;
use collab_engine::loadgen::{self, LoadConfig};

fn main() -> anyhow::Result<()> {
    let config: LoadConfig = collab_engine::cli::parse();
    env_logger::init();
    let fd_limit = loadgen::raise_fd_limit();
    if (fd_limit as usize) < config.total_clients() + 64 {
        eprintln!(
            "warning: open-file limit {fd_limit} is below the {} connections asked for",
            config.total_clients()
        );
    }
    let out = config.out.clone();
    let output = loadgen::run(config).context("load run failed")?;
    print!("{}", output.summary.to_text());
    if let Some(dir) = out {
        output
            .summary
            .write_files(&dir, &output.histograms)
            .with_context(|| format!("writing reports to {}", dir.display()))?;
        if let Some(metrics) = &output.server_metrics {
            std::fs::write(dir.join("server-metrics.prom"), metrics)
                .context("writing server-metrics.prom")?;
        }
        println!("reports written to {}", dir.display());
    }
    if !output.summary.is_clean() {
        eprintln!("warning: the run was not clean (failed/lost connections or rooms that did not converge)");
        std::process::exit(2);
    }
    Ok(())
}
