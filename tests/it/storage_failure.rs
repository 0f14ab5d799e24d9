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
