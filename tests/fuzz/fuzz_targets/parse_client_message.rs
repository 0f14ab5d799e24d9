//! Any text a client can send: the parser never panics, and an accepted op message re-encodes
//! canonically and parses back to the same value.
#![no_main]

use collab_engine::protocol::{encode_op, parse_client_message, ClientMessage, ErrorCode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_client_message(text) {
        Ok(ClientMessage::Op(msg)) => {
            assert!(!msg.ops.is_empty() && msg.ops.len() <= 10_000);
            let again = encode_op(msg.client_seq, &msg.ops);
            assert_eq!(parse_client_message(&again), Ok(ClientMessage::Op(msg)));
        }
        Ok(ClientMessage::Presence(update)) => {
            assert!(update.state_json.len() <= 4096);
            let value: serde_json::Value =
                serde_json::from_str(&update.state_json).expect("relayed presence is JSON");
            drop(value);
        }
        Ok(ClientMessage::Hello(hello)) => {
            if let Some(doc) = &hello.doc {
                assert!(!doc.is_empty() && doc.len() <= 512);
            }
            if let Some(replica) = hello.replica {
                assert!((1..=(1u64 << 53) - 1).contains(&replica));
            }
        }
        Err(err) => {
            assert!(err.code != ErrorCode::NotJoined);
        }
    }
});
