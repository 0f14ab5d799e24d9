//! The HTTP document API (`docs/api.md`) over real sockets against the real server: reads,
//! edits with and without `base` converging with WebSocket clients, deletion closing clients
//! and resetting the epoch (memory or PostgreSQL, and the disk backend across a restart),
//! listings with cursors, history and blame by two users with access control on, and every
//! error status.

use std::net::SocketAddr;

use collab_engine::auth::mint::{MintClaims, MintKey};
use collab_engine::auth::{now_unix, Role};
use collab_engine::config::{Config, StorageKind};
use serde_json::Value;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::util::*;

const SECRET: &[u8] = b"an HS256 secret for the API tests, 32+ bytes\n";

/// One request; returns the status and the body as JSON (`Null` for an empty body).
pub(crate) fn api(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let length = if method == "POST" || !body.is_empty() {
        format!("Content-Length: {}\r\n", body.len())
    } else {
        String::new()
    };
    let response = http_get(
        addr,
        &format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}{length}\r\n{body}"),
    );
    let status: u16 = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?} is not JSON: {e}"))
    };
    (status, json)
}

fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    api(addr, "GET", path, None, "")
}

fn post(addr: SocketAddr, doc: &str, body: &str) -> (u16, Value) {
    api(addr, "POST", &format!("/api/docs/{doc}/edits"), None, body)
}

#[test]
fn read_edit_and_converge_with_websocket_clients() {
    let _watchdog = Watchdog::new("api_read_edit", 60);
    let server = server(test_config());
    let addr = server.local_addr();
    // Never created by a read.
    assert_eq!(get(addr, "/api/docs/api%20one").0, 404);
    assert_eq!(get(addr, "/api/docs/api%20one/snapshot").0, 404);
    assert_eq!(get(addr, "/api/docs/api%20one").0, 404);
    let (status, body) = post(
        addr,
        "api%20one",
        r#"{"edits":[{"pos":0,"insert":"hello"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, serde_json::json!({"server_seq": 1, "head": 1}));
    let (status, doc) = get(addr, "/api/docs/api%20one");
    assert_eq!(status, 200);
    assert_eq!(doc["doc"], "api one");
    assert_eq!(
        (doc["head"].as_u64(), doc["length"].as_u64()),
        (Some(1), Some(5))
    );
    assert_eq!(doc["text"], "hello");
    let epoch = doc["epoch"].as_str().expect("epoch").to_owned();

    // A WebSocket client sees HTTP edits as ordinary op_echo frames.
    let mut editor = Editor::join(addr, "/ws/api%20one", r#"{"type":"hello"}"#);
    assert_eq!(editor.doc.text(), "hello");
    let (status, _) = post(
        addr,
        "api%20one",
        r#"{"edits":[{"pos":5,"insert":" world"},{"pos":0,"delete":1,"insert":"H"}]}"#,
    );
    assert_eq!(status, 200);
    editor.catch_up(2);
    assert_eq!(editor.doc.text(), "Hello world");

    // The client edits at head 3; an HTTP edit against base 2 still lands where it meant.
    editor.edit(11, 0, "!");
    editor.settle();
    assert_eq!(editor.head, 3);
    let (status, body) = post(
        addr,
        "api%20one",
        r#"{"edits":[{"pos":5,"insert":","}],"base":2}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["server_seq"], 4);
    editor.catch_up(4);
    assert_eq!(editor.doc.text(), "Hello, world!");
    let (_, doc) = get(addr, "/api/docs/api%20one");
    assert_eq!(doc["text"], "Hello, world!");
    assert_eq!(doc["epoch"], epoch.as_str());

    // Every version so far, deletions included, is readable with ?at=.
    let mut versions = vec![
        (0, String::new()),
        (1, "hello".to_owned()),
        (2, "Hello world".to_owned()),
        (3, "Hello world!".to_owned()),
        (4, "Hello, world!".to_owned()),
    ];
    editor.edit(0, 7, "");
    editor.settle();
    versions.push((5, "world!".to_owned()));
    assert_eq!(
        post(
            addr,
            "api%20one",
            r#"{"edits":[{"pos":0,"insert":"Hello, "}]}"#
        )
        .0,
        200
    );
    editor.catch_up(6);
    versions.push((6, "Hello, world!".to_owned()));
    for (at, text) in &versions {
        let (status, doc) = get(addr, &format!("/api/docs/api%20one?at={at}"));
        assert_eq!(status, 200, "{doc}");
        assert_eq!(
            (doc["head"].as_u64(), doc["text"].as_str()),
            (Some(*at), Some(text.as_str()))
        );
        assert_eq!(doc["length"].as_u64(), Some(text.chars().count() as u64));
    }

    // Concurrent edits from both sides converge.
    for i in 0..10 {
        editor.edit(0, 0, "w");
        let body = format!(r#"{{"edits":[{{"pos":{i},"insert":"h"}}]}}"#);
        assert_eq!(post(addr, "api%20one", &body).0, 200);
    }
    editor.settle();
    let (_, doc) = get(addr, "/api/docs/api%20one");
    editor.catch_up(doc["head"].as_u64().expect("head"));
    assert_eq!(doc["text"].as_str(), Some(editor.doc.text().as_str()));
    assert_eq!(doc["length"].as_u64(), Some(33));
    // Old versions are still exact after the interleaving.
    let (_, old) = get(addr, "/api/docs/api%20one?at=5");
    assert_eq!(old["text"], "world!");

    // The snapshot is in the contract's run format and decodes to the same text.
    let (status, snapshot) = get(addr, "/api/docs/api%20one/snapshot");
    assert_eq!(status, 200);
    assert_eq!(snapshot["head"], doc["head"]);
    let runs = collab_engine::protocol::messages::parse_snapshot_runs(
        &serde_json::json!({"runs": snapshot["runs"]}).to_string(),
    )
    .expect("runs parse");
    let rebuilt = collab_engine::crdt::Doc::from_snapshot(&runs).expect("runs decode");
    assert_eq!(rebuilt.text(), editor.doc.text());
    // ?at= the head is the head; ahead of it is refused.
    let head = doc["head"].as_u64().expect("head");
    let (status, at) = get(addr, &format!("/api/docs/api%20one?at={head}"));
    assert_eq!((status, at["text"].clone()), (200, doc["text"].clone()));
    assert_eq!(
        get(addr, &format!("/api/docs/api%20one?at={}", head + 1)).0,
        400
    );
    server.shutdown().expect("clean shutdown");
}

#[test]
fn bad_requests_change_nothing() {
    let _watchdog = Watchdog::new("api_errors", 60);
    let mut config = test_config();
    config.replay_window_ops = 4;
    let server = server(config);
    let addr = server.local_addr();
    assert_eq!(
        post(addr, "errs", r#"{"edits":[{"pos":0,"insert":"abc"}]}"#).0,
        200
    );
    let refused = [
        r#"{"edits":[{"pos":-1,"insert":"x"}]}"#,
        r#"{"edits":[{"pos":4,"insert":"x"}]}"#,
        r#"{"edits":[{"pos":2,"delete":2}]}"#,
        r#"{"edits":[{"pos":0,"insert":"xy"},{"pos":6,"insert":"z"}]}"#,
        r#"{"edits":[{"pos":0,"insert":"x"}],"base":9}"#,
        r#"{"edits":[{"pos":0,"oops":1}]}"#,
        r#"{"edits":"no"}"#,
        "not json",
    ];
    for body in refused {
        let (status, answer) = post(addr, "errs", body);
        assert_eq!(status, 400, "{body} -> {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let (_, doc) = get(addr, "/api/docs/errs");
    assert_eq!(
        (doc["head"].as_u64(), doc["text"].as_str()),
        (Some(1), Some("abc"))
    );
    // Methods, paths, lengths, names.
    assert_eq!(api(addr, "PUT", "/api/docs/errs", None, "").0, 405);
    assert_eq!(api(addr, "GET", "/api/docs/errs/edits", None, "").0, 405);
    assert_eq!(api(addr, "POST", "/api/docs", None, "{}").0, 405);
    assert_eq!(get(addr, "/api/docs/errs/nothing").0, 404);
    assert_eq!(get(addr, "/api/docs/%FF").0, 400);
    assert_eq!(get(addr, "/api/docs/errs?at=x").0, 400);
    let no_length = http_get(
        addr,
        "POST /api/docs/errs/edits HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(no_length.starts_with("HTTP/1.1 411 "), "{no_length}");
    let too_big = http_get(
        addr,
        "POST /api/docs/errs/edits HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
    );
    assert!(too_big.starts_with("HTTP/1.1 413 "), "{too_big}");
    // Nothing of them reached the document.
    let (_, doc) = get(addr, "/api/docs/errs");
    assert_eq!(
        (doc["head"].as_u64(), doc["text"].as_str()),
        (Some(1), Some("abc"))
    );
    // Versions and bases older than the retained history (a window of 4 op messages).
    for _ in 0..6 {
        assert_eq!(
            post(addr, "errs", r#"{"edits":[{"pos":0,"insert":"z"}]}"#).0,
            200
        );
    }
    let (status, gone) = get(addr, "/api/docs/errs?at=1");
    assert_eq!((status, gone["oldest"].as_u64()), (410, Some(3)), "{gone}");
    assert_eq!(get(addr, "/api/docs/errs?at=3").1["text"], "zzabc");
    let (status, old) = post(
        addr,
        "errs",
        r#"{"edits":[{"pos":0,"insert":"q"}],"base":2}"#,
    );
    assert_eq!((status, old["oldest"].as_u64()), (409, Some(3)), "{old}");
    let (status, old) = get(addr, "/api/docs/errs/history?from=1");
    assert_eq!((status, old["oldest"].as_u64()), (410, Some(4)), "{old}");
    assert_eq!(get(addr, "/api/docs/errs/events?since=1").0, 410);
    assert_eq!(get(addr, "/api/docs/errs").1["head"], 7);
    server.shutdown().expect("clean shutdown");
}

#[test]
fn delete_closes_clients_and_resets_the_epoch() {
    let _watchdog = Watchdog::new("api_delete", 60);
    let server = server(test_config());
    let addr = server.local_addr();
    assert_eq!(api(addr, "DELETE", "/api/docs/gone", None, "").0, 404);
    assert_eq!(
        post(addr, "gone", r#"{"edits":[{"pos":0,"insert":"abc"}]}"#).0,
        200
    );
    let (_, before) = get(addr, "/api/docs/gone");
    let mut ws = connect(addr, "/ws/gone");
    send(&mut ws, r#"{"type":"hello"}"#);
    assert_eq!(recv_json(&mut ws)["type"], "hello_ack");
    let (status, body) = api(addr, "DELETE", "/api/docs/gone", None, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], "gone");
    let frame = loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(e) => panic!("expected a close: {e}"),
        }
    };
    let frame = frame.expect("a close frame");
    assert_eq!(
        (frame.code, frame.reason.as_str()),
        (CloseCode::Policy, "deleted")
    );
    assert_eq!(get(addr, "/api/docs/gone").0, 404);
    assert_eq!(
        post(addr, "gone", r#"{"edits":[{"pos":0,"insert":"new"}]}"#).0,
        200
    );
    let (_, after) = get(addr, "/api/docs/gone");
    assert_eq!(
        (after["head"].as_u64(), after["text"].as_str()),
        (Some(1), Some("new"))
    );
    assert_ne!(after["epoch"], before["epoch"], "a new incarnation");
    server.shutdown().expect("clean shutdown");
}

#[test]
fn delete_on_disk_survives_a_restart() {
    let _watchdog = Watchdog::new("api_delete_disk", 60);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("it-api-delete-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = || {
        let mut config = Config::for_tests("127.0.0.1:0".parse().expect("addr"));
        config.storage = StorageKind::Disk;
        config.data_dir = dir.clone();
        config
    };
    let server = crate::util::server(config());
    let addr = server.local_addr();
    for doc in ["keep", "drop"] {
        assert_eq!(
            post(addr, doc, r#"{"edits":[{"pos":0,"insert":"x"}]}"#).0,
            200
        );
    }
    assert_eq!(api(addr, "DELETE", "/api/docs/drop", None, "").0, 200);
    server.shutdown().expect("clean shutdown");
    let server = crate::util::server(config());
    let addr = server.local_addr();
    assert_eq!(get(addr, "/api/docs/drop").0, 404);
    assert_eq!(get(addr, "/api/docs/keep").1["text"], "x");
    // The acceptance time is durable: it comes back from the log after the restart.
    let (_, history) = get(addr, "/api/docs/keep/history");
    assert!(
        history["entries"][0]["time"].as_u64().is_some(),
        "{history}"
    );
    let (_, list) = get(addr, "/api/docs");
    assert_eq!(list["docs"].as_array().map(Vec::len), Some(1), "{list}");
    server.shutdown().expect("clean shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn listing_pages_with_a_cursor() {
    let _watchdog = Watchdog::new("api_list", 60);
    let server = server(test_config());
    let addr = server.local_addr();
    let names = ["l%2F0", "l%2F1", "l%2F2", "l%2F3", "l%2F4", "m%2F0"];
    for (i, doc) in names.iter().enumerate() {
        let body = format!(
            r#"{{"edits":[{{"pos":0,"insert":"{}"}}]}}"#,
            "x".repeat(i + 1)
        );
        assert_eq!(post(addr, doc, &body).0, 200);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let after = cursor.as_deref().map_or(String::new(), |c| {
            format!("&after={}", c.replace('/', "%2F"))
        });
        let (status, page) = get(addr, &format!("/api/docs?prefix=l%2F&limit=2{after}"));
        assert_eq!(status, 200, "{page}");
        let docs = page["docs"].as_array().expect("docs").clone();
        assert!(docs.len() <= 2);
        for doc in &docs {
            assert_eq!(doc["head"], 1);
            assert!(
                doc["updated_at"]
                    .as_u64()
                    .is_some_and(|ms| ms > 1_600_000_000_000),
                "{doc}"
            );
            seen.push((
                doc["doc"].as_str().expect("name").to_owned(),
                doc["length"].as_u64(),
            ));
        }
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<(String, Option<u64>)> = (0..5)
        .map(|i| (format!("l/{i}"), Some(i as u64 + 1)))
        .collect();
    assert_eq!(seen, expected);
    let (_, all) = get(addr, "/api/docs");
    assert_eq!(all["docs"].as_array().map(Vec::len), Some(6));
    assert_eq!(all["next"], Value::Null);
    assert_eq!(get(addr, "/api/docs?limit=0").0, 400);
    server.shutdown().expect("clean shutdown");
}

fn token(key: &MintKey, sub: &str, doc: &str, role: Role) -> String {
    key.sign(&MintClaims::new(sub, doc, role, now_unix(), 3600), None)
        .expect("sign")
}

#[test]
fn tokens_history_and_blame_of_two_users() {
    let _watchdog = Watchdog::new("api_auth", 60);
    let dir = std::env::temp_dir().join(format!("collab-it-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("hs.key"), SECRET).expect("write");
    let key = MintKey::hs256(SECRET).expect("key");
    let mut config = test_config();
    config.auth.key_files = vec![dir.join("hs.key")];
    let server = server(config);
    let addr = server.local_addr();
    let alice = token(&key, "alice", "team/*", Role::Write);
    let bob = token(&key, "bob", "team/notes", Role::Write);
    let reader = token(&key, "carol", "team/*", Role::Read);
    let admin = token(&key, "root", "*", Role::Admin);
    let edits =
        |t: &str, body: &str| api(addr, "POST", "/api/docs/team%2Fnotes/edits", Some(t), body);

    // 401 without a valid token, 403 when it does not cover the doc or the role is too low.
    assert_eq!(get(addr, "/api/docs/team%2Fnotes").0, 401);
    assert_eq!(
        api(addr, "GET", "/api/docs/team%2Fnotes", Some("nope"), "").0,
        401
    );
    assert_eq!(api(addr, "GET", "/api/docs/other", Some(&alice), "").0, 403);
    assert_eq!(
        edits(&reader, r#"{"edits":[{"pos":0,"insert":"x"}]}"#).0,
        403
    );
    assert_eq!(
        api(addr, "DELETE", "/api/docs/team%2Fnotes", Some(&alice), "").0,
        403
    );
    assert_eq!(
        api(addr, "GET", "/api/docs?prefix=other", Some(&alice), "").0,
        403
    );
    assert_eq!(api(addr, "GET", "/api/docs", Some(&bob), "").0, 403);

    assert_eq!(
        edits(&alice, r#"{"edits":[{"pos":0,"insert":"Hello "}]}"#).0,
        200
    );
    assert_eq!(
        edits(&bob, r#"{"edits":[{"pos":6,"insert":"world"}]}"#).0,
        200
    );
    // A WebSocket client of bob's edits too; its replica is bound to bob.
    let mut editor = Editor::join(
        addr,
        &format!("/ws/team%2Fnotes?token={bob}"),
        r#"{"type":"hello"}"#,
    );
    editor.edit(11, 0, "!");
    editor.settle();

    let (status, blame) = api(
        addr,
        "GET",
        "/api/docs/team%2Fnotes/blame",
        Some(&reader),
        "",
    );
    assert_eq!(status, 200, "{blame}");
    assert_eq!(blame["head"], 3);
    assert_eq!(
        blame["runs"],
        serde_json::json!([{"text": "Hello ", "user": "alice"}, {"text": "world!", "user": "bob"}])
    );
    let (status, history) = api(
        addr,
        "GET",
        "/api/docs/team%2Fnotes/history?from=2&limit=5",
        Some(&reader),
        "",
    );
    assert_eq!(status, 200, "{history}");
    let entries = history["entries"].as_array().expect("entries");
    let seqs: Vec<u64> = entries
        .iter()
        .filter_map(|e| e["server_seq"].as_u64())
        .collect();
    assert_eq!(seqs, [2, 3]);
    assert_eq!(
        (entries[0]["user"].as_str(), entries[1]["user"].as_str()),
        (Some("bob"), Some("bob"))
    );
    assert_eq!(entries[1]["replica"].as_u64(), Some(editor.replica));
    assert!(entries[0]["ops"].is_array());
    // The time the server accepted each op message (unix ms), in order.
    let now_ms = now_unix() * 1000;
    let times: Vec<u64> = entries.iter().filter_map(|e| e["time"].as_u64()).collect();
    assert_eq!(times.len(), 2, "{history}");
    assert!(
        times[0] <= times[1] && times[1] <= now_ms + 1000,
        "{times:?}"
    );
    assert!(times[0] + 600_000 > now_ms, "{times:?}");
    assert_eq!(history["next"], Value::Null);
    let (_, first) = api(
        addr,
        "GET",
        "/api/docs/team%2Fnotes/history?limit=1",
        Some(&reader),
        "",
    );
    assert_eq!(first["entries"][0]["user"], "alice");
    assert_eq!(first["next"], 2);

    // Listing within the token's prefix, and beyond it as an admin.
    let (status, list) = api(addr, "GET", "/api/docs?prefix=team%2F", Some(&reader), "");
    assert_eq!(
        (status, list["docs"][0]["doc"].as_str()),
        (200, Some("team/notes"))
    );
    assert_eq!(api(addr, "GET", "/api/docs", Some(&admin), "").0, 200);
    let (status, body) = api(addr, "DELETE", "/api/docs/team%2Fnotes", Some(&admin), "");
    assert_eq!(status, 200, "{body}");
    let (code, _) = recv_until_close(&mut editor.ws);
    assert_eq!(code, Some(CloseCode::Policy));

    // Event streams end when their token expires or is revoked, like WebSocket clients.
    assert_eq!(
        edits(&alice, r#"{"edits":[{"pos":0,"insert":"x"}]}"#).0,
        200
    );
    let path = "/api/docs/team%2Fnotes/events";
    assert_eq!(api(addr, "GET", path, None, "").0, 401);
    let short = key
        .sign(
            &MintClaims::new("dave", "team/*", Role::Read, now_unix(), 2),
            None,
        )
        .expect("sign");
    let mut expiring = Events::open_with(addr, path, Some(&short));
    let mut revoked = Events::open_with(addr, path, Some(&reader));
    let (status, body) = api(
        addr,
        "POST",
        "/admin/revoke",
        Some(&admin),
        r#"{"sub":"carol"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert!(revoked.next().is_none(), "a revoked stream ends");
    assert!(expiring.next().is_none(), "an expired stream ends");
    server.shutdown().expect("clean shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An open event stream: the response head read, events read one at a time.
struct Events {
    reader: std::io::BufReader<std::net::TcpStream>,
}

impl Events {
    fn open(addr: SocketAddr, path: &str) -> Events {
        Events::open_with(addr, path, None)
    }

    fn open_with(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Events {
        use std::io::{BufRead, Write};
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").expect("write");
        let mut reader = std::io::BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).expect("status line");
        assert!(status.starts_with("HTTP/1.1 200 "), "{status}");
        let mut saw_type = false;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header");
            saw_type |= line.eq_ignore_ascii_case("content-type: text/event-stream\r\n");
            if line == "\r\n" {
                break;
            }
        }
        assert!(saw_type, "an event stream");
        Events { reader }
    }

    /// The next event as (event, id, data JSON); `None` at the end of the stream.
    fn next(&mut self) -> Option<(String, Option<u64>, Value)> {
        use std::io::BufRead;
        let (mut event, mut id, mut data) = (String::new(), None, None);
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).expect("read an event") == 0 {
                return None;
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                let data = data.expect("every event has data");
                return Some((event, id, data));
            }
            if let Some(v) = line.strip_prefix("event: ") {
                event = v.to_owned();
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = v.parse().ok();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str(v).expect("data is JSON"));
            }
        }
    }
}

#[test]
fn events_replay_since_then_live_then_deleted() {
    let _watchdog = Watchdog::new("api_events", 60);
    let server = server(test_config());
    let addr = server.local_addr();
    assert_eq!(get(addr, "/api/docs/ev/events").0, 404);
    for text in ["a", "b", "c"] {
        let body = format!(r#"{{"edits":[{{"pos":0,"insert":"{text}"}}]}}"#);
        assert_eq!(post(addr, "ev", &body).0, 200);
    }
    assert_eq!(get(addr, "/api/docs/ev/events?since=9").0, 400);
    let mut events = Events::open(addr, "/api/docs/ev/events?since=1");
    for seq in [2, 3] {
        let (event, id, data) = events.next().expect("a replayed event");
        assert_eq!((event.as_str(), id), ("op_echo", Some(seq)));
        assert_eq!(
            (data["type"].as_str(), data["server_seq"].as_u64()),
            (Some("op_echo"), Some(seq))
        );
    }
    let mut live = Events::open(addr, "/api/docs/ev/events");
    // Live: an HTTP edit and a WebSocket client's op, in server_seq order, on both streams.
    assert_eq!(
        post(addr, "ev", r#"{"edits":[{"pos":0,"insert":"d"}]}"#).0,
        200
    );
    let mut editor = Editor::join(addr, "/ws/ev", r#"{"type":"hello"}"#);
    editor.edit(0, 1, "");
    editor.settle();
    for stream in [&mut events, &mut live] {
        for seq in [4, 5] {
            let (event, id, data) = stream.next().expect("a live event");
            assert_eq!(
                (event.as_str(), id, data["server_seq"].as_u64()),
                ("op_echo", Some(seq), Some(seq))
            );
        }
    }
    assert_eq!(api(addr, "DELETE", "/api/docs/ev", None, "").0, 200);
    for stream in [&mut events, &mut live] {
        let (event, _, data) = stream.next().expect("the deleted event");
        assert_eq!(
            (event.as_str(), data["doc"].as_str()),
            ("deleted", Some("ev"))
        );
        assert!(stream.next().is_none(), "the stream ends after deleted");
    }
    server.shutdown().expect("clean shutdown");
}

#[test]
fn a_slow_event_reader_is_closed_and_the_document_goes_on() {
    use std::io::{Read, Write};
    let _watchdog = Watchdog::new("api_events_slow", 90);
    let mut config = test_config();
    config.outbound_bytes_max = 64 << 10;
    // One connection per request: the per-address connect rate is not what this tests.
    config.connects_per_ip_per_second = 0;
    config.connects_per_ip_burst = 0;
    let server = server(config);
    let addr = server.local_addr();
    assert_eq!(
        post(addr, "slow", r#"{"edits":[{"pos":0,"insert":"x"}]}"#).0,
        200
    );
    let mut slow = tcp_with_small_rcvbuf(addr);
    write!(
        slow,
        "GET /api/docs/slow/events HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .expect("write");
    let mut fast = Events::open(addr, "/api/docs/slow/events");
    // Far more than the limit plus every socket buffer on the way, never read by `slow`.
    let chunk = "y".repeat(128 << 10);
    let n_edits = 80u64;
    for _ in 0..n_edits {
        let body = format!(r#"{{"edits":[{{"pos":0,"insert":"{chunk}"}}]}}"#);
        assert_eq!(post(addr, "slow", &body).0, 200);
        // The fast reader keeps up and gets everything.
        let (event, _, _) = fast.next().expect("a live event");
        assert_eq!(event, "op_echo");
    }
    // The slow one was closed: reading what was buffered ends well before every event.
    let mut received = Vec::new();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    match slow.read_to_end(&mut received) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the slow stream was not closed: {e}"),
    }
    let n_events = String::from_utf8_lossy(&received)
        .matches("event: op_echo")
        .count() as u64;
    assert!(
        n_events < n_edits,
        "{n_events} events of {n_edits} reached the slow reader"
    );
    let (_, doc) = get(addr, "/api/docs/slow");
    assert_eq!(doc["head"].as_u64(), Some(n_edits + 1));
    server.shutdown().expect("clean shutdown");
}

/// A configuration whose documents survive a restart: PostgreSQL when the suite runs on it,
/// else a fresh data directory.
fn durable_config(tag: &str) -> Config {
    let mut config = test_config();
    if !on_postgres() {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("it-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        config.storage = StorageKind::Disk;
        config.data_dir = dir;
    }
    config
}

#[test]
fn history_retention_survives_compaction_and_restarts() {
    let _watchdog = Watchdog::new("api_retention", 90);
    let mut config = durable_config("retention");
    config.snapshot_every_ops = 5;
    config.history_retain_ops = 20;
    let edits = |addr, n: usize| {
        for _ in 0..n {
            assert_eq!(
                post(addr, "kept", r#"{"edits":[{"pos":0,"insert":"k"}]}"#).0,
                200
            );
        }
    };
    let server = crate::util::server(config.clone());
    edits(server.local_addr(), 50);
    server.shutdown().expect("clean shutdown");
    // After a restart (snapshots were written every 5 ops), the last 20 versions are there.
    let server = crate::util::server(config.clone());
    let addr = server.local_addr();
    let (_, doc) = get(addr, "/api/docs/kept");
    assert_eq!(doc["head"], 50);
    let (status, old) = get(addr, "/api/docs/kept?at=30");
    assert_eq!(
        (status, old["text"].as_str().map(str::len)),
        (200, Some(30)),
        "{old}"
    );
    let (status, gone) = get(addr, "/api/docs/kept?at=5");
    assert_eq!(status, 410, "{gone}");
    let oldest = gone["oldest"].as_u64().expect("oldest");
    assert!((25..=30).contains(&oldest), "{gone}");
    let (_, history) = get(addr, "/api/docs/kept/history?from=31&limit=5");
    assert_eq!(history["entries"][0]["server_seq"], 31);
    assert!(
        history["entries"][0]["time"].as_u64().is_some(),
        "{history}"
    );
    // An edit against a retained base after the restart.
    let (status, body) = post(
        addr,
        "kept",
        r#"{"edits":[{"pos":30,"insert":"!"}],"base":30}"#,
    );
    assert_eq!((status, body["head"].as_u64()), (200, Some(51)), "{body}");
    let (_, doc) = get(addr, "/api/docs/kept");
    assert!(
        doc["text"].as_str().is_some_and(|t| t.ends_with("!")),
        "{doc}"
    );
    server.shutdown().expect("clean shutdown");

    // Without retention, a restart keeps only what the last snapshot left.
    let mut config = durable_config("no-retention");
    config.snapshot_every_ops = 5;
    config.history_retain_ops = 0;
    let server = crate::util::server(config.clone());
    edits(server.local_addr(), 10);
    server.shutdown().expect("clean shutdown");
    let server = crate::util::server(config.clone());
    let (status, gone) = get(server.local_addr(), "/api/docs/kept?at=9");
    assert_eq!((status, gone["oldest"].as_u64()), (410, Some(10)), "{gone}");
    server.shutdown().expect("clean shutdown");

    // --history-retain: every op accepted within the last hour is kept.
    let mut config = durable_config("retain-time");
    config.snapshot_every_ops = 5;
    config.history_retain_ops = 0;
    config.history_retain = std::time::Duration::from_secs(3600);
    let server = crate::util::server(config.clone());
    edits(server.local_addr(), 12);
    server.shutdown().expect("clean shutdown");
    let server = crate::util::server(config);
    let (status, old) = get(server.local_addr(), "/api/docs/kept?at=1");
    assert_eq!((status, old["text"].as_str()), (200, Some("k")), "{old}");
    server.shutdown().expect("clean shutdown");
}

#[test]
fn event_streams_count_against_their_address() {
    let _watchdog = Watchdog::new("api_events_door", 60);
    let mut config = test_config();
    config.conns_per_ip_max = 2;
    let server = server(config);
    let addr = server.local_addr();
    assert_eq!(
        post(addr, "door", r#"{"edits":[{"pos":0,"insert":"d"}]}"#).0,
        200
    );
    let first = Events::open(addr, "/api/docs/door/events");
    let _second = Events::open(addr, "/api/docs/door/events");
    // Both streams are held by the shard and still count: a third connection is refused.
    let refused = http_get(addr, "GET /api/docs/door HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 429 "), "{refused}");
    // A stream that ends gives its place back (once the shard noticed and the acceptor heard;
    // the watchdog bounds the wait).
    drop(first);
    loop {
        let answer = http_get(addr, "GET /api/docs/door HTTP/1.1\r\nHost: x\r\n\r\n");
        if answer.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(answer.starts_with("HTTP/1.1 429 "), "{answer}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    server.shutdown().expect("clean shutdown");
}
