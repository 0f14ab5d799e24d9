//! `/metrics` of the real binary, checked line by line with a strict exposition-format reader
//! (`loadgen::prom`): histograms with cumulative buckets and `_count` equal to `+Inf`, one
//! series per shard and no merged `shard="all"` beside them, `process_*` and `collab_build_info`.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use collab_engine::loadgen::prom::{self, Family, Kind};

use crate::util::{http_get, spawn_server, Editor, Watchdog};

fn scrape(addr: std::net::SocketAddr) -> Vec<Family> {
    let response = http_get(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.contains("text/plain; version=0.0.4"),
        "the exposition format's content type: {head}"
    );
    prom::parse(body).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}"))
}

fn family<'a>(families: &'a [Family], name: &str) -> &'a Family {
    families
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no family {name}"))
}

fn total(families: &[Family], name: &str) -> f64 {
    family(families, name).samples.iter().map(|s| s.value).sum()
}

#[test]
fn metrics_are_a_valid_aggregatable_exposition() {
    let _w = Watchdog::new("metrics_are_a_valid_aggregatable_exposition", 60);
    let (mut child, addr) = spawn_server();
    let mut n_ops = 0;
    let mut editors = Vec::new();
    for doc in ["m0", "m1", "m2", "m3", "m4", "m5"] {
        let mut editor = Editor::join(addr, &format!("/ws/{doc}"), r#"{"type":"hello"}"#);
        for i in 0..5 {
            editor.edit(i, 0, "ab");
            n_ops += 1;
        }
        editor.settle();
        editors.push(editor);
    }
    // Shards publish every 250 ms; wait (under the watchdog) until every op is visible.
    let families = loop {
        let families = scrape(addr);
        if total(&families, "collab_ops_accepted_total") >= f64::from(n_ops) {
            break families;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        total(&families, "collab_ops_accepted_total"),
        f64::from(n_ops)
    );
    assert_eq!(total(&families, "collab_connections"), 6.0);

    let shards: BTreeSet<&str> = ["0", "1"].into();
    for f in families.iter().filter(|f| f.name.starts_with("collab_")) {
        // Per-node families: the door's and the relay's (cluster::relay).
        if f.name.starts_with("collab_door_")
            || f.name.starts_with("collab_relay_")
            || f.name == "collab_build_info"
        {
            continue;
        }
        let seen: BTreeSet<&str> = f.samples.iter().filter_map(|s| s.label("shard")).collect();
        assert_eq!(
            seen, shards,
            "{}: one series per shard, nothing merged",
            f.name
        );
        assert!(
            f.samples.iter().all(|s| s.label("quantile").is_none()),
            "{}: no summaries",
            f.name
        );
    }
    for name in [
        "collab_loop_turn_seconds",
        "collab_op_integrate_seconds",
        "collab_fsync_seconds",
        "collab_fanout_seconds",
    ] {
        let f = family(&families, name);
        assert_eq!(f.kind, Kind::Histogram, "{name}");
        let buckets = f
            .samples
            .iter()
            .filter(|s| s.name == format!("{name}_bucket") && s.label("shard") == Some("0"))
            .count();
        assert_eq!(buckets, 23, "{name}: 22 bounds and +Inf");
    }
    let integrated = prom::histogram_quantile(&families, "collab_op_integrate_seconds", 1.0);
    assert!(
        integrated.is_some_and(|s| s > 0.0),
        "ops were integrated: {integrated:?}"
    );
    let integrate_count: f64 = family(&families, "collab_op_integrate_seconds")
        .samples
        .iter()
        .filter(|s| s.name == "collab_op_integrate_seconds_count")
        .map(|s| s.value)
        .sum();
    assert_eq!(
        integrate_count,
        f64::from(n_ops),
        "one sample per op message"
    );

    for (name, kind) in [
        ("process_cpu_seconds_total", Kind::Counter),
        ("process_resident_memory_bytes", Kind::Gauge),
        ("process_virtual_memory_bytes", Kind::Gauge),
        ("process_start_time_seconds", Kind::Gauge),
        ("process_open_fds", Kind::Gauge),
        ("process_max_fds", Kind::Gauge),
    ] {
        let f = family(&families, name);
        assert_eq!((f.kind, f.samples.len()), (kind, 1), "{name}");
        // CPU time counts in clock ticks: a short test may not have spent one yet.
        let floor = if name == "process_cpu_seconds_total" {
            0.0
        } else {
            1.0
        };
        assert!(f.samples[0].value >= floor, "{name}: {:?}", f.samples[0]);
    }
    // Six WebSocket connections, the listener and the scrape itself are open descriptors.
    assert!(total(&families, "process_open_fds") >= 8.0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let started = total(&families, "process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 600.0,
        "started {started}, now {now}"
    );
    let info = family(&families, "collab_build_info");
    assert_eq!(info.samples.len(), 1);
    let sample = &info.samples[0];
    assert_eq!(sample.value, 1.0);
    assert_eq!(sample.label("version"), Some(env!("CARGO_PKG_VERSION")));
    assert!(
        sample
            .label("rustc")
            .is_some_and(|r| r.starts_with("rustc ")),
        "{sample:?}"
    );
    assert!(
        sample.label("git_commit").is_some_and(|c| !c.is_empty()),
        "{sample:?}"
    );
    drop(editors);
    let _ = child.kill();
    let _ = child.wait();
}
