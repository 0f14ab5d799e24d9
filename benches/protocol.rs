//! Hot-path costs of the protocol and room layers, single-threaded, no sockets:
//! parsing an op message, encoding its echo, a room integrating it and fanning it out,
//! and a client replica applying a remote echo. Prints nanoseconds per operation.
//!
//! Run: `cargo bench --bench protocol`

use std::hint::black_box;
use std::time::Instant;

use collab_engine::client::Replica;
use collab_engine::ids::ConnToken;
use collab_engine::protocol::{encode_op_echo, parse_client_message, ClientMessage, Hello};
use collab_engine::room::{Room, RoomConfig};

fn report(name: &str, n: u64, started: Instant) {
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("{name:<48} {ns:>10.0} ns/op  ({n} ops)");
}

fn config() -> RoomConfig {
    RoomConfig {
        snapshot_every_ops: u64::MAX,
        snapshot_every_bytes: u64::MAX,
        replay_window_ops: 10_000,
        doc_chars_max: usize::MAX,
    }
}

/// The op message a typist sends: one character after the previous one.
fn typing_message(client_seq: u64, lamport: u64, replica: u64) -> String {
    let after = if lamport == 0 {
        "null".to_string()
    } else {
        format!("[{},{replica}]", lamport - 1)
    };
    format!(
        r#"{{"type":"op","client_seq":{client_seq},"ops":[{{"kind":"ins","id":[{lamport},{replica}],"after":{after},"text":"x"}}]}}"#
    )
}

fn main() {
    let n: u64 = 200_000;

    let msg = typing_message(7, 41, 3);
    let started = Instant::now();
    for _ in 0..n {
        black_box(parse_client_message(black_box(&msg)).is_ok());
    }
    report("parse_client_message (1 ins)", n, started);

    let ops = match parse_client_message(&msg) {
        Ok(ClientMessage::Op(op)) => op.ops,
        _ => unreachable!("valid message"),
    };
    let started = Instant::now();
    for seq in 0..n {
        black_box(encode_op_echo(seq, 3, 7, black_box(&ops)));
    }
    report("encode_op_echo (1 ins)", n, started);

    for n_clients in [1usize, 10, 100] {
        let mut room = Room::open("bench".into(), None, config()).expect("room");
        for conn in 0..n_clients {
            room.join(ConnToken(conn), &Hello::default());
        }
        let _ = room.take_effects();
        let messages: Vec<String> = (0..n).map(|i| typing_message(i, i, 1)).collect();
        let started = Instant::now();
        for text in &messages {
            if let Ok(ClientMessage::Op(op)) = parse_client_message(text) {
                room.handle_op(ConnToken(0), op);
            }
            black_box(room.take_effects());
        }
        report(
            &format!("parse + Room::handle_op + fan-out to {n_clients}"),
            n,
            started,
        );
    }

    let mut room = Room::open("bench".into(), None, config()).expect("room");
    room.join(ConnToken(0), &Hello::default());
    room.join(ConnToken(1), &Hello::default());
    let mut replica = Replica::new("bench", None, None);
    let ack = room
        .take_effects()
        .frames
        .into_iter()
        .find(|(c, _)| *c == ConnToken(1))
        .expect("ack")
        .1;
    replica.handle_frame(&ack).expect("hello_ack");
    let echoes: Vec<_> = (0..n)
        .filter_map(|i| {
            if let Ok(ClientMessage::Op(op)) = parse_client_message(&typing_message(i, i, 1)) {
                room.handle_op(ConnToken(0), op);
            }
            room.take_effects()
                .frames
                .into_iter()
                .find(|(c, _)| *c == ConnToken(1))
                .map(|(_, f)| f)
        })
        .collect();
    let started = Instant::now();
    for echo in &echoes {
        black_box(replica.handle_frame(echo).is_ok());
    }
    report("Replica::handle_frame (remote echo, typing)", n, started);
    assert_eq!(replica.len(), n as usize);

    // Joining a document of 100,000 characters typed at scattered positions (100,000 runs,
    // about 3 MB of snapshot JSON): a full encode, then joins that reuse it.
    let mut room = Room::open("big".into(), None, config()).expect("room");
    room.join(ConnToken(0), &Hello::default());
    let mut writer = Replica::new("big", None, None);
    let ack = room.take_effects().frames.pop().expect("ack").1;
    writer.handle_frame(&ack).expect("hello_ack");
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..100_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let pos = (seed % (writer.len() as u64 + 1)) as usize;
        let msg = writer.insert(pos, "y").expect("in range");
        if let Ok(ClientMessage::Op(op)) = parse_client_message(&msg) {
            room.handle_op(ConnToken(0), op);
        }
        let _ = room.take_effects();
    }
    let started = Instant::now();
    room.join(ConnToken(100_000), &Hello::default());
    black_box(room.take_effects());
    report("join, 100k-char doc, full snapshot encode", 1, started);
    let n_joins: u64 = 50;
    let started = Instant::now();
    for conn in 1..=n_joins {
        // Each join follows a new op: the snapshot is at most a few ops behind and reused.
        let msg = writer.insert(0, "z").expect("in range");
        if let Ok(ClientMessage::Op(op)) = parse_client_message(&msg) {
            room.handle_op(ConnToken(0), op);
        }
        room.join(ConnToken(conn as usize), &Hello::default());
        black_box(room.take_effects());
    }
    report("join after each op, 100k-char doc", n_joins, started);
    let started = Instant::now();
    for conn in 1_000..1_000 + n_joins {
        room.join(ConnToken(conn as usize), &Hello::default());
        black_box(room.take_effects());
    }
    report("join, 100k-char doc, snapshot at head", n_joins, started);
}
