//! Hand-written scenarios on the simulator's parts: the regressions its runs found, each as a
//! fixed script (a seed's meaning changes whenever the scenario generator does; these do not).

use tungstenite::Message;

use crate::client::Replica;
use crate::protocol::messages::ServerMessage;

use super::db::DbBackend;
use super::harness::{frames, frames_and_close, join, Harness};
use super::rng::SimRng;
use super::Backend;

/// Found by the simulator (seed 1 of its first version): a connection that closed in the turn
/// in which an op was fanned out to it left that op's echo in the room's effects; the echo
/// was released with its batch to whichever connection got the slab key next, before that
/// connection's `hello_ack` (and it could have been another document's client).
#[test]
fn frames_for_a_closed_connection_never_reach_the_next_one_on_its_key() {
    let mut h = Harness::new();
    let (a_conn, mut a_ws) = h.connect("d");
    let (_, mut b_ws) = h.connect("d");
    let mut a = Replica::new("d", None, None);
    let mut b = Replica::new("d", None, None);
    join(&mut h, &mut a, &mut a_ws);
    join(&mut h, &mut b, &mut b_ws);
    frames(&mut a_ws);
    // In one turn: b's op (echoed to a too), then a's close.
    let op = b.insert(0, "x").expect("an insert");
    b_ws.send(Message::text(op)).expect("op");
    a_ws.close(None).expect("close");
    a_ws.flush().expect("flush");
    drop(a_ws);
    h.turn();
    h.turn();
    // The next connection takes a's slab key while the op's batch is not durable yet.
    let (c_conn, mut c_ws) = h.connect("d");
    assert_eq!(c_conn, a_conn, "the slab key is reused");
    let mut c = Replica::new("d", None, None);
    c_ws.send(Message::text(c.hello())).expect("hello");
    h.settle();
    let got = frames(&mut c_ws);
    assert!(
        matches!(got.first(), Some(ServerMessage::HelloAck(_))),
        "the first frame of the new connection is its hello_ack: {got:?}"
    );
    for frame in got {
        c.handle_message(frame).expect("a valid frame");
    }
    assert_eq!(c.text(), "x");
}

/// Found by the simulator on the database backend (seed 8 of its first version): while storage
/// was unreachable, an op of a connected client was refused with `unavailable` and the
/// connection stayed open; the client's next op, built on the refused one, was refused with
/// `unknown_id`, which a client drops while keeping the edit: the client diverged for good
/// (and the refused op waited for a reconnect that never came). Now the refusal closes the
/// connection with 1013 and nothing it sent after is applied; the client resends both, in
/// order, after reconnecting.
#[test]
fn an_op_refused_while_storage_is_down_closes_its_connection_and_nothing_after_it_applies() {
    let mut backend = DbBackend::new(1);
    let storage = backend.open(&mut SimRng::new(1)).expect("a connection");
    let mut h = Harness::over(storage);
    let (_, mut a_ws) = h.connect("d");
    let (_, mut b_ws) = h.connect("e");
    let mut a = Replica::new("d", None, None);
    let mut b = Replica::new("e", None, None);
    join(&mut h, &mut a, &mut a_ws);
    join(&mut h, &mut b, &mut b_ws);
    // Another document's commit finds the database down: storage is unreachable.
    backend.go_down_at_next_commit();
    let op = b.insert(0, "e").expect("an insert");
    b_ws.send(Message::text(op)).expect("op");
    h.turn();
    h.sync();
    // Two ops of a, the second after the first's text, in one turn.
    let first = a.insert(0, "1").expect("an insert");
    let second = a.insert(1, "2").expect("an insert");
    a_ws.send(Message::text(first)).expect("op");
    a_ws.send(Message::text(second)).expect("op");
    h.turn();
    h.turn();
    let (got, close) = frames_and_close(&mut a_ws);
    assert_eq!(close, Some(1013), "{got:?}");
    assert!(
        matches!(
            got.as_slice(),
            [ServerMessage::Error { code, client_seq: Some(1), .. }] if code == "unavailable"
        ),
        "one refusal, for the first op only: {got:?}"
    );
    for frame in got {
        a.handle_message(frame).expect("a valid frame");
    }
    assert_eq!(a.n_pending(), 2, "both stay pending");
    drop(a_ws);
    // The database answers again; a reconnects and resends both, in order.
    for _ in 0..4 {
        h.sync();
        h.turn();
    }
    let (_, mut a_ws) = h.connect("d");
    a_ws.send(Message::text(a.hello())).expect("hello");
    h.settle();
    for frame in frames(&mut a_ws) {
        if let crate::client::Event::Joined { resend, .. } =
            a.handle_message(frame).expect("a valid frame")
        {
            for message in resend {
                a_ws.send(Message::text(message)).expect("resend");
            }
        }
    }
    h.settle();
    for frame in frames(&mut a_ws) {
        a.handle_message(frame).expect("a valid frame");
    }
    assert_eq!((a.text().as_str(), a.n_pending()), ("12", 0));
    let (_, mut c_ws) = h.connect("d");
    let mut c = Replica::new("d", None, None);
    join(&mut h, &mut c, &mut c_ws);
    assert_eq!(c.text(), "12", "the shard applied both");
}
