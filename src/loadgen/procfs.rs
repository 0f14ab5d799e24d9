//! CPU time and resident memory of a process, read from `/proc` (Linux).
//!
//! Owns reading and parsing those two files; returns `None` rather than failing when they are
//! missing (another OS, or the process has exited).

use std::path::Path;

/// One reading of a process's counters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcSample {
    /// User plus system CPU time since the process started, in seconds.
    pub cpu_seconds: f64,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
    /// Time its threads spent runnable but waiting for a CPU, summed over threads, in seconds
    /// (`/proc/<pid>/task/*/schedstat`; 0 when the kernel has no schedstats). On a machine
    /// shared with other work this is where latency goes that no profile of the process shows.
    pub run_queue_wait_seconds: f64,
}

/// Reads `/proc/<pid>` (`None` for the calling process: `/proc/self`).
pub fn sample(pid: Option<u32>) -> Option<ProcSample> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}"),
        None => "/proc/self".to_owned(),
    };
    let stat = std::fs::read_to_string(Path::new(&dir).join("stat")).ok()?;
    let status = std::fs::read_to_string(Path::new(&dir).join("status")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let mut sample = parse(
        &stat,
        &status,
        if ticks_per_second > 0 {
            ticks_per_second as f64
        } else {
            100.0
        },
    )?;
    sample.run_queue_wait_seconds = run_queue_wait_seconds(Path::new(&dir));
    Some(sample)
}

/// Sums the run-queue wait (second field of `schedstat`, nanoseconds) over every thread.
fn run_queue_wait_seconds(dir: &Path) -> f64 {
    let Ok(tasks) = std::fs::read_dir(dir.join("task")) else {
        return 0.0;
    };
    let mut wait_ns: u64 = 0;
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) {
            wait_ns += text
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    wait_ns as f64 / 1e9
}

/// The host's 1-minute load average, from `/proc/loadavg`.
pub fn load_average_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Parses the text of `/proc/<pid>/stat` and `/proc/<pid>/status`.
fn parse(stat: &str, status: &str, ticks_per_second: f64) -> Option<ProcSample> {
    // The command name (field 2) may hold spaces and parentheses: fields restart after the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())?;
    Some(ProcSample {
        cpu_seconds: (utime + stime) as f64 / ticks_per_second,
        rss_bytes: rss_kib * 1024,
        run_queue_wait_seconds: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_and_status() {
        let stat = "1234 (odd (name) x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        let status = "Name:\tx\nVmPeak:\t 9 kB\nVmRSS:\t    2048 kB\nThreads: 1\n";
        let sample = parse(stat, status, 100.0).expect("parses");
        assert_eq!(sample.rss_bytes, 2048 * 1024);
        assert!((sample.cpu_seconds - 3.0).abs() < 1e-9, "{sample:?}");
        assert_eq!(parse("garbage", status, 100.0), None);
    }

    #[test]
    fn reads_this_process() {
        let me = sample(None).expect("/proc/self is readable on Linux");
        assert!(me.rss_bytes > 0);
    }
}
