//! Access control over real sockets: every refusal, the read role, expiry, refresh, replica
//! owners, revocation across shards and restarts, the admin surface, and key rotation by
//! SIGHUP of the real binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use collab_engine::auth::mint::{ed25519_pem_pair, MintClaims, MintKey};
use collab_engine::auth::{now_unix, Role};
use collab_engine::config::{Config, StorageKind};
use collab_engine::ids::shard_for_doc;
use collab_engine::server::ServerHandle;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::util::*;

const SECRET: &[u8] = b"an HS256 secret for the tests, 32+ bytes\n";

struct Keys {
    dir: PathBuf,
    hs: MintKey,
    ed: MintKey,
    ed_public: String,
}

fn keys(name: &str) -> Keys {
    let dir = std::env::temp_dir().join(format!("collab-it-auth-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (private, public) = ed25519_pem_pair(&[42; 32]);
    std::fs::write(dir.join("hs.key"), SECRET).expect("write");
    std::fs::write(dir.join("ed.pem"), &public).expect("write");
    Keys {
        hs: MintKey::hs256(SECRET).expect("key"),
        ed: MintKey::ed25519_pem(private.as_bytes()).expect("key"),
        ed_public: public,
        dir,
    }
}

impl Keys {
    fn config(&self) -> Config {
        let mut config = test_config();
        config.auth.key_files = vec![self.dir.join("hs.key"), self.dir.join("ed.pem")];
        config
    }

    fn token(&self, sub: &str, doc: &str, role: Role) -> String {
        self.hs
            .sign(&MintClaims::new(sub, doc, role, now_unix(), 3600), None)
            .expect("sign")
    }
}

/// Connects to `path` (after `?token=` etc. if any), sends `hello`, expects `unauthorized`
/// and a close 1008; returns the message.
fn expect_refused(addr: SocketAddr, path: &str, hello: &str) -> String {
    let mut ws = connect(addr, path);
    send(&mut ws, hello);
    let (code, seen) = recv_until_close(&mut ws);
    assert_eq!(
        code,
        Some(CloseCode::Policy),
        "{path} {hello:.80}: {seen:?}"
    );
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["code"], "unauthorized", "{seen:?}");
    seen[0]["message"].as_str().expect("message").to_owned()
}

fn hello_with(doc: &str, token: &str) -> String {
    format!(r#"{{"type":"hello","doc":"{doc}","token":"{token}"}}"#)
}

fn b64(bytes: &[u8]) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    URL_SAFE_NO_PAD.encode(bytes)
}

#[test]
fn every_refusal_is_unauthorized_and_1008() {
    let _w = Watchdog::new("every_refusal_is_unauthorized_and_1008", 60);
    let k = keys("refusals");
    let server = server(k.config());
    let addr = server.local_addr();
    let now = now_unix();
    let sign = |key: &MintKey, claims: &MintClaims| key.sign(claims, None).expect("sign");
    let write = |doc: &str| MintClaims::new("alice", doc, Role::Write, now, 3600);
    let mut expired = write("d");
    expired.exp = now - 1;
    let mut future_iat = write("d");
    future_iat.iat = now + 120;
    let other = MintKey::hs256(b"some other secret, 32 bytes or more").expect("key");
    let confused = MintKey::hs256(k.ed_public.as_bytes()).expect("key");
    let payload = b64(format!(
        r#"{{"sub":"alice","exp":{},"doc":"*","role":"admin"}}"#,
        now + 3600
    )
    .as_bytes());
    let alg_none = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
    #[derive(serde::Serialize)]
    struct Nbf {
        sub: &'static str,
        exp: u64,
        nbf: u64,
        doc: &'static str,
        role: &'static str,
    }
    let nbf =
        k.hs.sign(
            &Nbf {
                sub: "alice",
                exp: now + 3600,
                nbf: now + 120,
                doc: "d",
                role: "write",
            },
            None,
        )
        .expect("sign");
    let oversize = format!("{}.{}.x", "a".repeat(4096), "b".repeat(4200));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "no token",
            r#"{"type":"hello","doc":"d"}"#.to_owned(),
            "a token is required",
        ),
        ("garbage", hello_with("d", "garbage"), "token is not a JWT"),
        (
            "bad signature",
            hello_with("d", &sign(&other, &write("d"))),
            "token signature does not verify",
        ),
        (
            "alg none",
            hello_with("d", &alg_none),
            "unsigned tokens (alg none) are refused",
        ),
        (
            "HS256 with the public key",
            hello_with("d", &sign(&confused, &write("d"))),
            "token signature does not verify",
        ),
        (
            "expired",
            hello_with("d", &sign(&k.ed, &expired)),
            "token expired",
        ),
        (
            "iat ahead",
            hello_with("d", &sign(&k.hs, &future_iat)),
            "token was issued in the future (iat)",
        ),
        (
            "nbf ahead",
            hello_with("d", &nbf),
            "token is not valid yet (nbf)",
        ),
        (
            "wrong doc",
            hello_with("d", &sign(&k.hs, &write("e"))),
            "token does not cover this document",
        ),
        (
            "prefix edge",
            hello_with("team-70", &sign(&k.hs, &write("team-7/*"))),
            "token does not cover this document",
        ),
        (
            "oversize",
            hello_with("d", &oversize),
            "token is longer than 8 KiB",
        ),
    ];
    for (what, hello, reason) in &cases {
        // Plain /ws: decided by the acceptor on the first hello.
        assert_eq!(&expect_refused(addr, "/ws", hello), reason, "{what} on /ws");
        // /ws/<doc>: decided by the shard on hello.token.
        let doc = serde_json::from_str::<serde_json::Value>(hello).expect("json")["doc"]
            .as_str()
            .expect("doc")
            .to_owned();
        assert_eq!(
            &expect_refused(addr, &format!("/ws/{doc}"), hello),
            reason,
            "{what} on /ws/{doc}"
        );
    }
    // The token in the query: decided by the acceptor right after the upgrade.
    let bad = sign(&other, &write("d"));
    assert_eq!(
        expect_refused(addr, &format!("/ws/d?token={bad}"), r#"{"type":"hello"}"#),
        "token signature does not verify"
    );
    // Tokens that disagree.
    let good = k.token("alice", "d", Role::Write);
    let good2 = k.token("bob", "d", Role::Write);
    assert_eq!(
        expect_refused(
            addr,
            &format!("/ws/d?token={good}"),
            &hello_with("d", &good2)
        ),
        "the token in the query, the Authorization header and hello.token differ"
    );
    // Every good path works: query, hello, prefix, EdDSA.
    let ok = Editor::join(addr, &format!("/ws/d?token={good}"), r#"{"type":"hello"}"#);
    assert!(ok.replica >= 1);
    let prefix = sign(&k.hs, &write("team-7/*"));
    let ok = Editor::join(addr, "/ws", &hello_with("team-7/a", &prefix));
    assert!(ok.replica >= 1);
    let ed = sign(&k.ed, &write("team-7"));
    let ok = Editor::join(addr, "/ws/team-7", &hello_with("team-7", &ed));
    assert!(ok.replica >= 1);
    // Refused clients loaded no document: only the three joined ones are (the shards publish
    // their final figures when they stop).
    let metrics = server.metrics().clone();
    server.shutdown().expect("clean shutdown");
    assert_eq!(metrics.totals().docs_loaded, 3);
}

#[test]
fn bearer_header_and_hello_ack_fields() {
    let _w = Watchdog::new("bearer_header_and_hello_ack_fields", 30);
    let k = keys("bearer");
    let server = server(k.config());
    let addr = server.local_addr();
    let mut c = MintClaims::new("alice", "doc", Role::Read, now_unix(), 600);
    c.name = Some("Alice A.".into());
    let token = k.hs.sign(&c, None).expect("sign");
    let stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("timeout");
    let mut request =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}/ws/doc"))
            .expect("request");
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (mut ws, _) =
        tungstenite::client::client(request, tungstenite::stream::MaybeTlsStream::Plain(stream))
            .expect("handshake");
    send(&mut ws, r#"{"type":"hello"}"#);
    let ack = recv_json(&mut ws);
    assert_eq!(ack["type"], "hello_ack");
    assert_eq!(ack["role"], "read");
    assert_eq!(ack["user"], "alice");
    assert_eq!(ack["exp"], c.exp);
    // A second client sees alice's presence with user and name.
    send(&mut ws, r#"{"type":"presence","state":{"cursor":1}}"#);
    let writer = k.token("bob", "doc", Role::Write);
    let mut bob = connect(addr, &format!("/ws/doc?token={writer}"));
    send(&mut bob, r#"{"type":"hello"}"#);
    let ack = recv_json(&mut bob);
    let presence = &ack["presence"];
    if presence.as_array().is_some_and(|p| p.is_empty()) {
        // Alice's presence may arrive after bob joined.
        let msg = recv_json(&mut bob);
        assert_eq!(
            (msg["user"].as_str(), msg["name"].as_str()),
            (Some("alice"), Some("Alice A."))
        );
    } else {
        assert_eq!(presence[0]["user"], "alice");
        assert_eq!(presence[0]["name"], "Alice A.");
    }
    server.shutdown().expect("clean shutdown");
}

#[test]
fn read_role_ops_are_forbidden_and_change_nothing() {
    let _w = Watchdog::new("read_role_ops_are_forbidden_and_change_nothing", 30);
    let k = keys("read");
    let server = server(k.config());
    let addr = server.local_addr();
    let reader = k.token("reader", "doc", Role::Read);
    let mut r = Editor::join(
        addr,
        &format!("/ws/doc?token={reader}"),
        r#"{"type":"hello"}"#,
    );
    let op = format!(
        r#"{{"type":"op","client_seq":7,"ops":[{{"kind":"ins","id":[1,{}],"after":null,"text":"x"}}]}}"#,
        r.replica
    );
    send(&mut r.ws, &op);
    let err = recv_json(&mut r.ws);
    assert_eq!(err["code"], "forbidden");
    assert_eq!(err["client_seq"], 7);
    // Still usable: presence goes through, and a writer sees an empty document at head 0.
    send(&mut r.ws, r#"{"type":"presence","state":{"cursor":0}}"#);
    let writer = k.token("writer", "doc", Role::Write);
    let w = Editor::join(
        addr,
        &format!("/ws/doc?token={writer}"),
        r#"{"type":"hello"}"#,
    );
    assert_eq!((w.head, w.doc.text()), (0, String::new()));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn expiry_closes_a_live_connection_and_refresh_extends_it() {
    let _w = Watchdog::new("expiry_closes_a_live_connection_and_refresh_extends_it", 60);
    let k = keys("expiry");
    let server = server(k.config());
    let addr = server.local_addr();
    let short = |sub: &str| {
        k.hs.sign(
            &MintClaims::new(sub, "doc", Role::Write, now_unix(), 2),
            None,
        )
        .expect("sign")
    };
    // Refreshed in time: stays open past the first exp, answered with auth_ack.
    let mut kept = Editor::join(
        addr,
        &format!("/ws/doc?token={}", short("alice")),
        r#"{"type":"hello"}"#,
    );
    let long = k.token("alice", "doc", Role::Write);
    send(
        &mut kept.ws,
        &format!(r#"{{"type":"auth","token":"{long}"}}"#),
    );
    let ack = recv_json(&mut kept.ws);
    assert_eq!(ack["type"], "auth_ack");
    assert!(ack["exp"].as_u64().expect("exp") > now_unix() + 60);
    assert_eq!(ack["role"], "write");
    // Not refreshed: closed 1008 "token expired" once exp passes.
    let mut lapsing = connect(addr, &format!("/ws/doc?token={}", short("carol")));
    send(&mut lapsing, r#"{"type":"hello"}"#);
    assert_eq!(recv_json(&mut lapsing)["type"], "hello_ack");
    let (code, seen) = recv_until_close(&mut lapsing);
    assert_eq!(code, Some(CloseCode::Policy));
    assert_eq!(seen.last().expect("error")["message"], "token expired");
    // The refreshed one is still alive: an edit goes through.
    kept.edit(0, 0, "ok");
    kept.settle();
    // A refresh for another user is refused and closes.
    let bob = k.token("bob", "doc", Role::Write);
    send(
        &mut kept.ws,
        &format!(r#"{{"type":"auth","token":"{bob}"}}"#),
    );
    let (code, seen) = recv_until_close(&mut kept.ws);
    assert_eq!(code, Some(CloseCode::Policy));
    assert_eq!(seen.last().expect("error")["code"], "unauthorized");
    server.shutdown().expect("clean shutdown");
}

#[test]
fn a_refresh_can_lower_the_role() {
    let _w = Watchdog::new("a_refresh_can_lower_the_role", 30);
    let k = keys("downgrade");
    let server = server(k.config());
    let addr = server.local_addr();
    let writer = k.token("alice", "doc", Role::Write);
    let mut a = Editor::join(
        addr,
        &format!("/ws/doc?token={writer}"),
        r#"{"type":"hello"}"#,
    );
    a.edit(0, 0, "x");
    a.settle();
    let reader = k.token("alice", "doc", Role::Read);
    send(
        &mut a.ws,
        &format!(r#"{{"type":"auth","token":"{reader}"}}"#),
    );
    let ack = recv_json(&mut a.ws);
    assert_eq!(ack["type"], "auth_ack");
    assert_eq!(ack["role"], "read", "auth_ack names the lowered role");
    let op = format!(
        r#"{{"type":"op","client_seq":9,"ops":[{{"kind":"ins","id":[50,{}],"after":null,"text":"y"}}]}}"#,
        a.replica
    );
    send(&mut a.ws, &op);
    let err = recv_json(&mut a.ws);
    assert_eq!(
        (&err["code"], &err["client_seq"]),
        (&"forbidden".into(), &9.into())
    );
    // A refresh that does not cover the document closes the connection.
    let elsewhere = k.token("alice", "other", Role::Write);
    send(
        &mut a.ws,
        &format!(r#"{{"type":"auth","token":"{elsewhere}"}}"#),
    );
    let (code, seen) = recv_until_close(&mut a.ws);
    assert_eq!(code, Some(CloseCode::Policy));
    assert_eq!(
        seen.last().expect("error")["message"],
        "token does not cover this document"
    );
    server.shutdown().expect("clean shutdown");
}

#[test]
fn a_replica_belongs_to_its_first_user() {
    let _w = Watchdog::new("a_replica_belongs_to_its_first_user", 30);
    let k = keys("owners");
    let data = k.dir.join("data");
    let mut config = k.config();
    config.storage = StorageKind::Disk;
    config.data_dir = data.clone();
    let server = server(config.clone());
    let addr = server.local_addr();
    let alice = k.token("alice", "doc", Role::Write);
    let bob = k.token("bob", "doc", Role::Write);
    let a = Editor::join(
        addr,
        "/ws/doc",
        &format!(r#"{{"type":"hello","replica":5,"token":"{alice}"}}"#),
    );
    assert_eq!(a.replica, 5);
    drop(a);
    let mut b = connect(addr, "/ws/doc");
    send(
        &mut b,
        &format!(r#"{{"type":"hello","replica":5,"token":"{bob}"}}"#),
    );
    let (code, seen) = recv_until_close(&mut b);
    assert_eq!(code, Some(CloseCode::Policy));
    assert_eq!(seen[0]["code"], "forbidden");
    server.shutdown().expect("clean shutdown");
    // Durable: after a restart bob is still refused and alice is welcome.
    let server = crate::util::server(config);
    let addr = server.local_addr();
    let mut b = connect(addr, "/ws/doc");
    send(
        &mut b,
        &format!(r#"{{"type":"hello","replica":5,"token":"{bob}"}}"#),
    );
    let (_, seen) = recv_until_close(&mut b);
    assert_eq!(seen[0]["code"], "forbidden");
    let a = Editor::join(
        addr,
        "/ws/doc",
        &format!(r#"{{"type":"hello","replica":5,"token":"{alice}"}}"#),
    );
    assert_eq!(a.replica, 5);
    server.shutdown().expect("clean shutdown");
}

fn http_post(addr: SocketAddr, path: &str, bearer: Option<&str>, body: &str) -> (u16, String) {
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let response = http_get(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    status_and_body(&response)
}

fn status_and_body(response: &str) -> (u16, String) {
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

fn metrics_status(addr: SocketAddr, bearer: Option<&str>) -> u16 {
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    status_and_body(&http_get(
        addr,
        &format!("GET /metrics HTTP/1.1\r\n{auth}\r\n"),
    ))
    .0
}

/// Two documents on different shards.
fn docs_on_both_shards(n_shards: usize) -> (String, String) {
    let first = "rev-0".to_owned();
    let shard = shard_for_doc(&first, n_shards);
    let second = (1..)
        .map(|i| format!("rev-{i}"))
        .find(|doc| shard_for_doc(doc, n_shards) != shard)
        .expect("another shard");
    (first, second)
}

fn revoke_server(k: &Keys, data: &Path) -> ServerHandle {
    let mut config = k.config();
    config.storage = StorageKind::Disk;
    config.data_dir = data.to_owned();
    crate::util::server(config)
}

#[test]
fn revocation_closes_on_every_shard_and_survives_a_restart() {
    let _w = Watchdog::new(
        "revocation_closes_on_every_shard_and_survives_a_restart",
        60,
    );
    let k = keys("revoke");
    let data = k.dir.join("data");
    let server = revoke_server(&k, &data);
    let addr = server.local_addr();
    let (doc_a, doc_b) = docs_on_both_shards(2);
    let admin = k.token("ops", "*", Role::Admin);
    let writer = k.token("mallory", "*", Role::Write);
    let mut live = Vec::new();
    for doc in [&doc_a, &doc_b] {
        live.push(Editor::join(
            addr,
            &format!("/ws/{doc}?token={writer}"),
            r#"{"type":"hello"}"#,
        ));
    }
    let bystander = k.token("alice", "*", Role::Write);
    let mut alice = Editor::join(
        addr,
        &format!("/ws/{doc_a}?token={bystander}"),
        r#"{"type":"hello"}"#,
    );
    // Admin endpoints refuse non-admins.
    assert_eq!(
        http_post(addr, "/admin/revoke", None, r#"{"sub":"mallory"}"#).0,
        401
    );
    assert_eq!(
        http_post(addr, "/admin/revoke", Some(&writer), r#"{"sub":"mallory"}"#).0,
        403
    );
    let narrow = k.token("ops", "team/*", Role::Admin);
    assert_eq!(
        http_post(addr, "/admin/revoke", Some(&narrow), r#"{"sub":"mallory"}"#).0,
        403
    );
    assert_eq!(
        http_post(addr, "/admin/revoke", Some(&admin), r#"{"nope":1}"#).0,
        400
    );
    assert_eq!(metrics_status(addr, None), 401);
    assert_eq!(metrics_status(addr, Some(&writer)), 403);
    assert_eq!(metrics_status(addr, Some(&admin)), 200);
    // Revoke the user: both shards close its connections.
    let (status, body) = http_post(addr, "/admin/revoke", Some(&admin), r#"{"sub":"mallory"}"#);
    assert_eq!((status, body.as_str()), (200, r#"{"closed":2}"#));
    for editor in &mut live {
        let (code, seen) = recv_until_close(&mut editor.ws);
        assert_eq!(code, Some(CloseCode::Policy));
        assert_eq!(seen.last().expect("error")["message"], "token revoked");
    }
    // Others are untouched.
    alice.edit(0, 0, "still here");
    alice.settle();
    server.shutdown().expect("clean shutdown");
    // After a restart the old token is still refused.
    let server = revoke_server(&k, &data);
    let addr = server.local_addr();
    assert_eq!(
        expect_refused(
            addr,
            &format!("/ws/{doc_a}?token={writer}"),
            r#"{"type":"hello"}"#
        ),
        "token revoked"
    );
    server.shutdown().expect("clean shutdown");
}

#[test]
fn admin_listen_moves_metrics_and_metrics_public_opens_it() {
    let _w = Watchdog::new("admin_listen_moves_metrics_and_metrics_public_opens_it", 30);
    let k = keys("adminlisten");
    let mut config = k.config();
    config.auth.admin_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let server = server(config);
    let admin_addr = server.admin_addr().expect("admin listener");
    let admin = k.token("ops", "*", Role::Admin);
    assert_eq!(metrics_status(server.local_addr(), Some(&admin)), 404);
    assert_eq!(metrics_status(admin_addr, None), 401);
    assert_eq!(metrics_status(admin_addr, Some(&admin)), 200);
    server.shutdown().expect("clean shutdown");
    let mut config = k.config();
    config.auth.metrics_public = true;
    let server = crate::util::server(config);
    assert_eq!(metrics_status(server.local_addr(), None), 200);
    server.shutdown().expect("clean shutdown");
}

#[test]
fn sighup_rotates_the_keys_of_the_real_binary() {
    let _w = Watchdog::new("sighup_rotates_the_keys_of_the_real_binary", 60);
    let k = keys("sighup");
    let key_file = k.dir.join("hs.key");
    let key_arg = key_file.to_str().expect("utf-8 path").to_owned();
    let (mut child, addr) = spawn_server_with(&["--auth-key-file", &key_arg]);
    let old = k.token("alice", "doc", Role::Write);
    let ok = Editor::join(addr, &format!("/ws/doc?token={old}"), r#"{"type":"hello"}"#);
    drop(ok);
    let new_secret = b"the rotated secret, also at least 32 bytes";
    std::fs::write(&key_file, new_secret).expect("rotate");
    let new_key = MintKey::hs256(new_secret).expect("key");
    let new = new_key
        .sign(
            &MintClaims::new("alice", "doc", Role::Write, now_unix(), 600),
            None,
        )
        .expect("sign");
    // SAFETY: kill() sends a signal to our own child; no memory is involved.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0);
    // The reload happens on the signal thread: wait until the new key is accepted.
    let mut accepted = false;
    for _ in 0..100 {
        let mut ws = connect(addr, &format!("/ws/doc?token={new}"));
        send(&mut ws, r#"{"type":"hello"}"#);
        if recv_json(&mut ws)["type"] == "hello_ack" {
            accepted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(accepted, "the rotated key was never accepted");
    assert_eq!(
        expect_refused(addr, &format!("/ws/doc?token={old}"), r#"{"type":"hello"}"#),
        "token signature does not verify"
    );
    child.kill().expect("kill");
    let _ = child.wait();
}

/// The token a property-test client presents.
#[derive(Clone, Copy, Debug)]
enum TokenKind {
    Missing,
    Garbage,
    Write,
    Admin,
    Read,
    Expired,
    WrongDoc,
    PrefixMiss,
    BadSignature,
    AlgNone,
    PublicKeyAsSecret,
}

impl TokenKind {
    const ALL: [TokenKind; 11] = [
        TokenKind::Missing,
        TokenKind::Garbage,
        TokenKind::Write,
        TokenKind::Admin,
        TokenKind::Read,
        TokenKind::Expired,
        TokenKind::WrongDoc,
        TokenKind::PrefixMiss,
        TokenKind::BadSignature,
        TokenKind::AlgNone,
        TokenKind::PublicKeyAsSecret,
    ];

    fn may_write(self) -> bool {
        matches!(self, TokenKind::Write | TokenKind::Admin)
    }

    fn token(self, k: &Keys, doc: &str) -> Option<String> {
        let now = now_unix();
        let claims = |doc: &str, role| MintClaims::new("prop", doc, role, now, 600);
        let sign = |key: &MintKey, c: &MintClaims| Some(key.sign(c, None).expect("sign"));
        match self {
            TokenKind::Missing => None,
            TokenKind::Garbage => Some("not.a.token".to_owned()),
            TokenKind::Write => sign(&k.ed, &claims(doc, Role::Write)),
            TokenKind::Admin => sign(&k.hs, &claims("*", Role::Admin)),
            TokenKind::Read => sign(&k.hs, &claims(doc, Role::Read)),
            TokenKind::Expired => {
                let mut c = claims(doc, Role::Write);
                c.exp = now - 1;
                sign(&k.hs, &c)
            }
            TokenKind::WrongDoc => sign(&k.hs, &claims("elsewhere", Role::Write)),
            // `prop-7` is not covered by `prop-70*` (a prefix is not a name).
            TokenKind::PrefixMiss => sign(&k.hs, &claims(&format!("{doc}0*"), Role::Write)),
            TokenKind::BadSignature => {
                let other = MintKey::hs256(b"not the server's secret, 32+ bytes").expect("key");
                sign(&other, &claims(doc, Role::Write))
            }
            TokenKind::AlgNone => {
                let payload = format!(
                    r#"{{"sub":"prop","exp":{},"doc":"*","role":"admin"}}"#,
                    now + 600
                );
                Some(format!(
                    "{}.{}.",
                    b64(br#"{"alg":"none"}"#),
                    b64(payload.as_bytes())
                ))
            }
            TokenKind::PublicKeyAsSecret => {
                let confused = MintKey::hs256(k.ed_public.as_bytes()).expect("key");
                sign(&confused, &claims(doc, Role::Admin))
            }
        }
    }
}

mod property {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    static N_CASES: AtomicUsize = AtomicUsize::new(0);

    /// One server for every case (keys never change), each case on its own document.
    fn shared() -> &'static (ServerHandle, Keys) {
        static SHARED: OnceLock<(ServerHandle, Keys)> = OnceLock::new();
        SHARED.get_or_init(|| {
            let k = keys("property");
            (crate::util::server(k.config()), k)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

        /// Whatever token a client presents, wherever it puts it, and whatever ops it sends:
        /// the document changes only when the token is a valid `write` (or `admin`) token
        /// covering it.
        #[test]
        fn no_op_is_applied_without_a_valid_write_token(
            kind_idx in 0..TokenKind::ALL.len(),
            place in 0..3u8,
            n_ops in 1..5usize,
            texts in proptest::collection::vec("[a-z]{1,3}", 5),
        ) {
            let _w = Watchdog::new("no_op_is_applied_without_a_valid_write_token", 60);
            let (server, k) = shared();
            let addr = server.local_addr();
            let kind = TokenKind::ALL[kind_idx];
            let doc = format!("prop-{}", N_CASES.fetch_add(1, Ordering::Relaxed));
            let token = kind.token(k, &doc);
            let (path, hello) = match (place, &token) {
                (0, Some(t)) => ("/ws".to_owned(), hello_with(&doc, t)),
                (1, Some(t)) => (format!("/ws/{doc}"), format!(r#"{{"type":"hello","token":"{t}"}}"#)),
                (_, Some(t)) => (format!("/ws/{doc}?token={t}"), r#"{"type":"hello"}"#.to_owned()),
                (_, None) => (format!("/ws/{doc}"), r#"{"type":"hello"}"#.to_owned()),
            };
            let mut ws = connect(addr, &path);
            send(&mut ws, &hello);
            // The replica from hello_ack, if admitted; ops are sent either way.
            let mut replica = 1;
            let mut open = true;
            match ws.read() {
                Ok(tungstenite::Message::Text(text)) => {
                    let msg: serde_json::Value = serde_json::from_str(&text).expect("JSON");
                    if msg["type"] == "hello_ack" {
                        replica = msg["replica"].as_u64().expect("replica");
                    } else {
                        prop_assert_eq!(&msg["code"], "unauthorized");
                        open = false;
                    }
                }
                other => prop_assert!(false, "unexpected {other:?}"),
            }
            let mut written = String::new();
            // Each insert goes to the front with ids above every earlier one.
            let mut lamport = 1;
            for (i, text) in texts.iter().take(n_ops).enumerate() {
                let op = format!(
                    r#"{{"type":"op","client_seq":{},"ops":[{{"kind":"ins","id":[{lamport},{replica}],"after":null,"text":"{text}"}}]}}"#,
                    i + 1
                );
                lamport += text.len();
                if open && ws.send(tungstenite::Message::text(op)).is_err() {
                    open = false;
                }
                written.insert_str(0, text);
            }
            if open {
                // One answer per op (echo or forbidden) before looking at the document.
                let mut n_answers = 0;
                while n_answers < n_ops {
                    let msg = recv_json(&mut ws);
                    if msg["type"] == "op_echo" || msg["type"] == "error" {
                        n_answers += 1;
                    }
                }
            }
            let reader = k.token("checker", &doc, Role::Read);
            let check = Editor::join(addr, &format!("/ws/{doc}?token={reader}"), r#"{"type":"hello"}"#);
            if kind.may_write() {
                prop_assert_eq!(check.doc.text(), written);
            } else {
                prop_assert_eq!(check.doc.text(), "");
                prop_assert_eq!(check.head, 0);
            }
        }
    }
}
