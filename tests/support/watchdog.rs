//! The one watchdog of every test binary: a test still running after its limit aborts the
//! whole test process (a hang must fail CI, never stall it), first killing every child process
//! the tests registered, so no server outlives the run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Child processes to kill with SIGKILL before an abort.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Aborts the test process if it is still alive `seconds` after `new`, unless dropped first.
pub struct Watchdog {
    done: Arc<AtomicBool>,
}

impl Watchdog {
    /// Starts the watchdog of test `name`.
    pub fn new(name: &'static str, seconds: u64) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            for _ in 0..seconds * 10 {
                std::thread::sleep(Duration::from_millis(100));
                if flag.load(Ordering::Relaxed) {
                    return;
                }
            }
            eprintln!("watchdog: test {name} still running after {seconds}s; aborting");
            let children = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
            for pid in children {
                // SAFETY: a signal to a child process a test started and registered.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
            std::process::abort();
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Registers a child process for the watchdog to kill before it aborts.
#[allow(dead_code)] // Not every test binary starts processes.
pub fn kill_on_abort(pid: u32) {
    if let Ok(mut children) = CHILDREN.lock() {
        children.push(pid);
    }
}

/// Forgets a child registered with [`kill_on_abort`] (it has exited: its pid may be reused).
#[allow(dead_code)] // Not every test binary starts processes.
pub fn forget_child(pid: u32) {
    if let Ok(mut children) = CHILDREN.lock() {
        children.retain(|&p| p != pid);
    }
}
