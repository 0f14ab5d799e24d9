//! The group commit's failure path: a failed sync releases no echo; the op's origin gets
//! `unavailable` with its `client_seq`, every client of the room gets `unavailable` and a
//! close 1013; other documents are unaffected; after reconnecting, a resend applies once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use collab_engine::server::start_with_storages;
use collab_engine::storage::{
    LogRecord, MemoryStorage, Storage, StorageError, StoredDoc, StoredSnapshot,
};
use tungstenite::protocol::frame::coding::CloseCode;

use crate::util::{connect, recv_json, recv_until_close, send, test_config, Editor, Watchdog};

/// Memory storage whose `sync` fails while `fail` is set (the records stay appended, as if
/// the write reached the disk but the fsync reported an error).
struct Flaky {
    inner: MemoryStorage,
    fail: Arc<AtomicBool>,
}

impl Storage for Flaky {
    fn load(&mut self, doc: &str) -> Result<Option<StoredDoc>, StorageError> {
        self.inner.load(doc)
    }
    fn append(&mut self, doc: &str, epoch: &str, record: &LogRecord) -> Result<(), StorageError> {
        self.inner.append(doc, epoch, record)
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StorageError::Io {
                context: "test".into(),
                source: std::io::Error::other("injected"),
            });
        }
        self.inner.sync()
    }
    fn write_snapshot(&mut self, doc: &str, snapshot: &StoredSnapshot) -> Result<(), StorageError> {
        self.inner.write_snapshot(doc, snapshot)
    }
    fn release(&mut self, doc: &str) {
        self.inner.release(doc)
    }
}

fn hello(doc: &str) -> String {
    collab_engine::protocol::encode_hello(Some(doc), None, None, None, None)
}

#[test]
fn storage_failure_answers_unavailable_and_closes_the_room() {
    let _w = Watchdog::new("storage_failure", 60);
    let fail = Arc::new(AtomicBool::new(false));
    let mut config = test_config();
    config.shards = 1;
    let storage: Box<dyn Storage> = Box::new(Flaky {
        inner: MemoryStorage::new(),
        fail: fail.clone(),
    });
    let server = start_with_storages(&config, vec![storage]).expect("server");
    let addr = server.local_addr();
    let mut origin = Editor::join(addr, "/ws/flaky", &hello("flaky"));
    let mut other = Editor::join(addr, "/ws/flaky", &hello("flaky"));
    let mut bystander = Editor::join(addr, "/ws/calm", &hello("calm"));
    origin.edit(0, 0, "durable");
    origin.settle();
    other.catch_up(1);

    fail.store(true, Ordering::SeqCst);
    origin.edit(7, 0, "!");
    let resend = origin.unacked.values().next().expect("unacked").clone();
    let (code, seen) = recv_until_close(&mut origin.ws);
    assert_eq!(code, Some(CloseCode::Again));
    assert!(
        seen.iter()
            .all(|m| m["type"] == "error" && m["code"] == "unavailable"),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|m| m["client_seq"] == 2),
        "the origin learns which op failed: {seen:?}"
    );
    let (code, seen) = recv_until_close(&mut other.ws);
    assert_eq!(code, Some(CloseCode::Again));
    assert!(
        seen.iter().all(|m| m["type"] != "op_echo"),
        "no echo of an op that is not durable: {seen:?}"
    );
    fail.store(false, Ordering::SeqCst);

    // Another document on the same shard carries on.
    bystander.edit(0, 0, "fine");
    bystander.settle();

    // Reconnect and resend: applied exactly once.
    let mut ws = connect(addr, "/ws/flaky");
    send(
        &mut ws,
        &collab_engine::protocol::encode_hello(
            None,
            Some(origin.replica),
            Some(1),
            Some(&origin.epoch),
            None,
        ),
    );
    let ack = recv_json(&mut ws);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    send(&mut ws, &resend);
    let reply = recv_json(&mut ws);
    assert!(
        reply["type"] == "ack" || reply["type"] == "op_echo",
        "{reply}"
    );
    let late = Editor::join(addr, "/ws/flaky", &hello("flaky"));
    assert_eq!(late.doc.text(), "durable!");
    server.shutdown().expect("clean shutdown");
}

/// The HTTP document API on the failure path: an edit whose sync fails is answered 503 (never
/// 200), and the document's event streams end without its echo.
#[test]
fn storage_failure_fails_api_edits_and_ends_event_streams() {
    use std::io::{Read, Write};
    let _w = Watchdog::new("storage_failure_api", 60);
    let fail = Arc::new(AtomicBool::new(false));
    let mut config = test_config();
    config.shards = 1;
    let storage: Box<dyn Storage> = Box::new(Flaky {
        inner: MemoryStorage::new(),
        fail: fail.clone(),
    });
    let server = start_with_storages(&config, vec![storage]).expect("server");
    let addr = server.local_addr();
    let post = |body: &str| {
        crate::util::http_get(
            addr,
            &format!(
                "POST /api/docs/shaky/edits HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let durable = post(r#"{"edits":[{"pos":0,"insert":"kept"}]}"#);
    assert!(durable.starts_with("HTTP/1.1 200 "), "{durable}");
    let mut events = std::net::TcpStream::connect(addr).expect("connect");
    events
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    write!(
        events,
        "GET /api/docs/shaky/events HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .expect("write");
    // The stream has started (its head came) before the failure.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        events.read_exact(&mut byte).expect("the stream's head");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200 "), "{head:?}");

    fail.store(true, Ordering::SeqCst);
    let failed = post(r#"{"edits":[{"pos":4,"insert":" lost"}]}"#);
    assert!(failed.starts_with("HTTP/1.1 503 "), "{failed}");
    let mut seen = Vec::new();
    events.read_to_end(&mut seen).expect("the stream ends");
    let seen = String::from_utf8_lossy(&seen);
    assert!(!seen.contains("event: op_echo"), "{seen}");

    // The document is read again from storage (which, like a disk whose fsync failed after
    // the write, may or may not hold the failed edit: it was never acknowledged either way).
    fail.store(false, Ordering::SeqCst);
    let read = crate::util::http_get(addr, "GET /api/docs/shaky HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        read.starts_with("HTTP/1.1 200 ") && read.contains(r#""text":"kept"#),
        "{read}"
    );
    server.shutdown().expect("clean shutdown");
}
