//! Client frames from a few connections into one room, as the shard dispatches them: nothing
//! panics, every frame out is a contract message, and the CRDT stays consistent.
//! Input: lines of "<conn digit><frame text>".
#![no_main]

use collab_engine::ids::ConnToken;
use collab_engine::protocol::{parse_client_message, parse_server_message, ClientMessage};
use collab_engine::room::{Room, RoomConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = RoomConfig {
        snapshot_every_ops: 7,
        snapshot_every_bytes: 4096,
        replay_window_ops: 5,
        doc_chars_max: 1_000,
        token: None,
    };
    let mut room = Room::open("doc".into(), None, config).expect("a new room");
    for line in text.lines().take(64) {
        let mut chars = line.chars();
        let Some(conn) = chars.next().and_then(|c| c.to_digit(10)) else {
            continue;
        };
        let conn = ConnToken(conn as usize % 4);
        let frame = chars.as_str();
        match parse_client_message(frame) {
            Ok(ClientMessage::Hello(hello)) => room.join(conn, &hello),
            Ok(ClientMessage::Op(msg)) => room.handle_op(conn, msg),
            Ok(ClientMessage::Presence(update)) => room.handle_presence(conn, update),
            Err(err) => room.refuse(conn, &err),
        }
        if frame.is_empty() {
            room.leave(conn);
        }
        for (_, out) in room.take_effects().frames {
            if let Err(err) = parse_server_message(&out) {
                panic!("the room sent a non-contract frame {out:?}: {err}");
            }
        }
    }
});
