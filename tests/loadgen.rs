//! Smoke test of `collab-load` against an in-process server: a few clients edit for about a
//! second; the run must join everyone, converge and fill the histograms. No timing assertions.

use clap::Parser as _;
use collab_engine::config::Config;
use collab_engine::loadgen::{self, LoadConfig, RunOutput};

#[path = "support/watchdog.rs"]
mod watchdog;

#[test]
fn a_short_run_converges_with_non_empty_histograms() {
    let _watchdog = watchdog::Watchdog::new("a_short_run_converges_with_non_empty_histograms", 60);
    let server =
        collab_engine::server::start(Config::for_tests("127.0.0.1:0".parse().expect("addr")))
            .expect("server starts");
    let url = format!("ws://{}", server.local_addr());
    let pid = std::process::id().to_string();
    let config = LoadConfig::parse_from([
        "collab-load",
        "--url",
        &url,
        "--rooms",
        "3",
        "--clients-per-room",
        "3",
        "--writers-per-room",
        "2",
        "--edit-interval",
        "20ms",
        "--arrivals",
        "poisson",
        "--edit-size",
        "3",
        "--delete-percent",
        "20",
        "--warmup",
        "200ms",
        "--duration",
        "1s",
        "--threads",
        "2",
        "--join-timeout",
        "10s",
        "--drain-timeout",
        "5s",
        // The server runs in this process: its CPU figures include the generator's, which
        // is enough to check that they are filled.
        "--server-pid",
        &pid,
    ]);
    let RunOutput {
        summary,
        histograms,
        server_metrics,
    } = loadgen::run(config).expect("run completes");
    let text = summary.to_text();
    assert_eq!(summary.counters.conns_joined, 9, "{text}");
    assert_eq!(
        summary.counters.conns_failed + summary.counters.conns_lost,
        0,
        "{text}"
    );
    assert_eq!(summary.convergence.rooms_checked, 3, "{text}");
    assert_eq!(summary.convergence.rooms_converged, 3, "{text}");
    assert!(summary.counters.edits_sent > 0, "{text}");
    assert!(!histograms.delivery_us.is_empty(), "{text}");
    assert!(!histograms.echo_us.is_empty(), "{text}");
    assert_eq!(histograms.join_us.len(), 9, "{text}");
    assert!(
        !summary
            .counters
            .errors
            .keys()
            .any(|k| k.starts_with("client_")),
        "replicas integrated every message: {text}"
    );

    let per_delivery = summary.server_cpu_us_per_delivery;
    assert!(
        per_delivery.is_some_and(|us| us.is_finite() && us >= 0.0),
        "{per_delivery:?}"
    );
    assert!(text.contains("server CPU per delivery:"), "{text}");
    let metrics = server_metrics.expect("the server answered /metrics");
    collab_engine::loadgen::prom::parse(&metrics).expect("a valid exposition");
    let integrate = &summary.server_latency_ms["collab_op_integrate_seconds"];
    assert!(integrate.count > 0 && integrate.p99 > 0.0, "{integrate:?}");

    let dir = std::env::temp_dir().join(format!("collab-load-smoke-{}", std::process::id()));
    summary
        .write_files(&dir, &histograms)
        .expect("reports written");
    for file in [
        "summary.json",
        "delivery.hgrm",
        "echo.hgrm",
        "join.hgrm",
        "latency.svg",
    ] {
        assert!(dir.join(file).is_file(), "{file} missing");
    }
    let _ = std::fs::remove_dir_all(&dir);
    server.shutdown().expect("clean shutdown");
}
