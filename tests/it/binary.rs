//! The `collab-engine` binary itself: prints the bound address, serves, and on SIGTERM closes
//! its clients with 1001 and exits 0.

use tungstenite::protocol::frame::coding::CloseCode;

use crate::util::{connect, recv_json, recv_until_close, send, spawn_server, Watchdog};

#[test]
fn binary_prints_address_and_shuts_down_on_sigterm() {
    let _w = Watchdog::new("binary_prints_address_and_shuts_down_on_sigterm", 60);
    let (mut child, addr) = spawn_server();
    assert_ne!(addr.port(), 0);
    let mut ws = connect(addr, "/ws/bin");
    send(&mut ws, r#"{"type":"hello"}"#);
    assert_eq!(recv_json(&mut ws)["type"], "hello_ack");
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (code, _) = recv_until_close(&mut ws);
    assert_eq!(code, Some(CloseCode::Away));
    drop(ws);
    let status = child.wait().expect("wait");
    assert!(status.success(), "exit status {status:?}");
}
