//! Any text a server (or a man in the middle) can send a client: the parser never panics.
#![no_main]

use collab_engine::protocol::{parse_server_message, parse_snapshot_runs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_server_message(text);
    let _ = parse_snapshot_runs(text);
});
