//! Plain HTTP: /health, /metrics, static pages, 404/400/405, bad document names.

use crate::util::{http_get, server, test_config, Watchdog};

#[test]
fn http_health_metrics_and_errors() {
    let _w = Watchdog::new("http_health_metrics_and_errors", 30);
    let server = server(test_config());
    let addr = server.local_addr();
    let health = http_get(addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200 "), "{health}");
    let body = health.split("\r\n\r\n").nth(1).expect("body");
    let json: serde_json::Value = serde_json::from_str(body).expect("health is JSON");
    assert_eq!(json["status"], "ok");
    assert_eq!(json["shards"], 2);
    assert!(
        json["connections"].is_u64() && json["documents"].is_u64(),
        "{json}"
    );

    let metrics = http_get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
    assert!(metrics.starts_with("HTTP/1.1 200 "), "{metrics}");
    assert!(
        metrics.contains("collab_connections{shard=\"1\"}"),
        "{metrics}"
    );

    let index = http_get(addr, "GET / HTTP/1.1\r\n\r\n");
    assert!(
        index.starts_with("HTTP/1.1 200 ") && index.contains("text/html"),
        "{index}"
    );

    for (request, status) in [
        ("GET /nope HTTP/1.1\r\n\r\n", "404"),
        ("POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "405"),
        ("GET /ws/doc HTTP/1.1\r\n\r\n", "400"),
        ("BLAH\r\n\r\n", "400"),
        ("GET /ws/%ZZ HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", "400"),
        ("GET /ws/%FF HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", "400"),
    ] {
        let response = http_get(addr, request);
        assert!(response.starts_with(&format!("HTTP/1.1 {status} ")), "{request:?} -> {response}");
    }
    let long = format!(
        "GET /ws/{} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        "a".repeat(513)
    );
    assert!(http_get(addr, &long).starts_with("HTTP/1.1 400 "));
    server.shutdown().expect("clean shutdown");
}
