//! [`Client`]: a blocking WebSocket transport (std `TcpStream` with read timeouts, tungstenite's
//! client) around a [`Replica`]. For integration tests, the JS mixed test, crash tests and tools.
//!
//! Every call that waits takes a timeout, so a test can never hang on it.

use std::collections::VecDeque;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

use super::replica::{Event, Replica, ReplicaError};

/// Why a [`Client`] call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL did not parse or names no host.
    #[error("bad URL: {0}")]
    Url(String),
    /// Connecting or a socket call failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The WebSocket layer failed (handshake refused, protocol error, ...).
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// The deadline passed first.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The server closed the connection (code and reason of its close frame, if any).
    #[error("connection closed by the server: {code:?} {reason}")]
    Closed {
        /// The close code.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
    /// The server refused the `hello`.
    #[error("hello refused: {code}: {message}")]
    Refused {
        /// The error code.
        code: String,
        /// The server's explanation.
        message: String,
    },
    /// The replica refused the call or a frame.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

/// How a [`Client`] connects.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Ask for this replica (else the server assigns one).
    pub replica: Option<u64>,
    /// Sent as `hello.token`.
    pub token: Option<String>,
    /// Limit for connecting, the handshake and the `hello_ack`.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            replica: None,
            token: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A blocking client of one document. See the module docs.
#[derive(Debug)]
pub struct Client {
    url: String,
    options: ClientOptions,
    socket: Option<WebSocket<TcpStream>>,
    replica: Replica,
    /// Events not yet returned by [`Client::poll`] (waits collect them here).
    events: VecDeque<Event>,
    /// The close frame the server sent, once it did.
    closed: Option<(Option<u16>, String)>,
}

impl Client {
    /// Connects to `url` (`ws://127.0.0.1:PORT/ws` or `.../ws/<doc>`), joins `doc` and waits for
    /// the `hello_ack` (its [`Event::Joined`] is queued for [`Client::poll`] like any other).
    ///
    /// # Errors
    /// Connecting, the handshake or the join failed or timed out.
    pub fn connect(url: &str, doc: &str, options: ClientOptions) -> Result<Client, ClientError> {
        let replica = Replica::new(doc, options.replica, options.token.clone());
        let mut client = Client {
            url: url.to_owned(),
            options,
            socket: None,
            replica,
            events: VecDeque::new(),
            closed: None,
        };
        client.join()?;
        Ok(client)
    }

    /// Opens a new connection, sends `hello` (with `since`/`epoch` after the first join), waits
    /// for the `hello_ack` and resends every unacknowledged op message.
    fn join(&mut self) -> Result<(), ClientError> {
        let deadline = Instant::now() + self.options.timeout;
        self.socket = None;
        self.closed = None;
        let request = self.url.as_str().into_client_request()?;
        let host = request
            .uri()
            .host()
            .ok_or_else(|| ClientError::Url(self.url.clone()))?;
        let port = request.uri().port_u16().unwrap_or(80);
        let addr = (host.trim_start_matches('[').trim_end_matches(']'), port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| ClientError::Url(self.url.clone()))?;
        let stream = TcpStream::connect_timeout(&addr, self.options.timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(self.options.timeout))?;
        stream.set_write_timeout(Some(self.options.timeout))?;
        let (socket, _response) =
            tungstenite::client(request, stream).map_err(|err| match err {
                tungstenite::HandshakeError::Failure(err) => ClientError::WebSocket(err),
                tungstenite::HandshakeError::Interrupted(_) => {
                    ClientError::Timeout("the WebSocket handshake")
                }
            })?;
        self.socket = Some(socket);
        let hello = self.replica.hello();
        self.send_text(hello)?;
        // Events queued before this join stay for poll/take_events; the Joined event too.
        let start = self.events.len();
        loop {
            self.pump_until(deadline, self.events.len())?;
            for event in self.events.range(start..) {
                match event {
                    Event::Joined { resend, .. } => {
                        for text in resend.clone() {
                            self.send_text(text)?;
                        }
                        return Ok(());
                    }
                    Event::Error {
                        code,
                        message,
                        client_seq: None,
                    } => {
                        return Err(ClientError::Refused {
                            code: code.clone(),
                            message: message.clone(),
                        })
                    }
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout("hello_ack"));
            }
        }
    }

    /// Closes the current connection (if any) and joins again with `since` and `epoch`,
    /// resending every unacknowledged op message with its original `client_seq`.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub fn reconnect(&mut self) -> Result<(), ClientError> {
        if let Some(mut socket) = self.socket.take() {
            let _ = socket.close(None);
            let _ = socket.flush();
        }
        self.join()
    }

    /// [`Client::reconnect`] to another URL (a server restarted on another port).
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub fn reconnect_to(&mut self, url: &str) -> Result<(), ClientError> {
        url.clone_into(&mut self.url);
        self.reconnect()
    }

    /// Drops the connection without a close handshake (as a crash would).
    pub fn drop_connection(&mut self) {
        self.socket = None;
    }

    fn socket(&mut self) -> Result<&mut WebSocket<TcpStream>, ClientError> {
        match (&mut self.socket, &self.closed) {
            (Some(socket), None) => Ok(socket),
            (_, Some((code, reason))) => Err(ClientError::Closed {
                code: *code,
                reason: reason.clone(),
            }),
            (None, None) => Err(ClientError::Closed {
                code: None,
                reason: "not connected".into(),
            }),
        }
    }

    /// Sends one text frame as is (tests use it to send malformed messages).
    ///
    /// # Errors
    /// The connection is closed or the write failed.
    pub fn send_text(&mut self, text: String) -> Result<(), ClientError> {
        self.socket()?.send(Message::text(text))?;
        Ok(())
    }

    /// Inserts `text` at character `pos` and sends the op message.
    ///
    /// # Errors
    /// A refused edit or a failed send (the edit then stays pending for [`Client::reconnect`]).
    pub fn insert(&mut self, pos: usize, text: &str) -> Result<(), ClientError> {
        let msg = self.replica.insert(pos, text)?;
        self.send_text(msg)
    }

    /// Deletes `len` characters at `pos` and sends the op message.
    ///
    /// # Errors
    /// As [`Client::insert`].
    pub fn delete(&mut self, pos: usize, len: usize) -> Result<(), ClientError> {
        match self.replica.delete(pos, len)? {
            Some(msg) => self.send_text(msg),
            None => Ok(()),
        }
    }

    /// Sends a presence state (`state_json` must be valid JSON; `"null"` clears it).
    ///
    /// # Errors
    /// A failed send.
    pub fn set_presence(&mut self, state_json: &str) -> Result<(), ClientError> {
        self.send_text(Replica::presence_message(state_json))
    }

    /// Reads frames until `deadline`; returns early once more than `baseline` events are queued
    /// and no further frame is immediately readable.
    fn pump_until(&mut self, deadline: Instant, baseline: usize) -> Result<(), ClientError> {
        loop {
            let now = Instant::now();
            let waiting = self.events.len() <= baseline && now < deadline;
            let socket = self.socket()?;
            if waiting {
                socket.get_mut().set_nonblocking(false)?;
                socket
                    .get_mut()
                    .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))?;
            } else {
                socket.get_mut().set_nonblocking(true)?;
            }
            let read = socket.read();
            let _ = socket.get_mut().set_nonblocking(false);
            match read {
                Ok(Message::Text(text)) => {
                    let event = self.replica.handle_frame(&text)?;
                    self.events.push_back(event);
                }
                Ok(Message::Close(frame)) => {
                    let (code, reason) = match frame {
                        Some(frame) => (Some(u16::from(frame.code)), frame.reason.to_string()),
                        None => (None, String::new()),
                    };
                    self.closed = Some((code, reason.clone()));
                    return if self.events.len() <= baseline {
                        Err(ClientError::Closed { code, reason })
                    } else {
                        Ok(())
                    };
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(err))
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(());
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    let (code, reason) = self
                        .closed
                        .clone()
                        .unwrap_or((None, "connection closed".into()));
                    self.closed = Some((code, reason.clone()));
                    return if self.events.len() <= baseline {
                        Err(ClientError::Closed { code, reason })
                    } else {
                        Ok(())
                    };
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Waits up to `timeout` for server frames and returns every event since the last call
    /// (possibly none).
    ///
    /// # Errors
    /// The connection closed (after the events before the close were returned) or failed.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<Event>, ClientError> {
        if self.events.is_empty() {
            self.pump_until(Instant::now() + timeout, 0)?;
        }
        Ok(self.events.drain(..).collect())
    }

    /// Events queued by waits, without reading the socket.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    fn wait(
        &mut self,
        timeout: Duration,
        what: &'static str,
        done: impl Fn(&Replica) -> bool,
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        while !done(&self.replica) {
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout(what));
            }
            // Queued events stay for poll/take_events; wait for new ones.
            self.pump_until(deadline, self.events.len())?;
        }
        Ok(())
    }

    /// Waits until every op message sent is acknowledged.
    ///
    /// # Errors
    /// `Timeout`, or the connection closed or failed.
    pub fn wait_until_acked(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.wait(timeout, "acknowledgements", |replica| {
            replica.n_pending() == 0
        })
    }

    /// Waits until the replica has seen `server_seq >= head`.
    ///
    /// # Errors
    /// `Timeout`, or the connection closed or failed.
    pub fn wait_for_head(&mut self, head: u64, timeout: Duration) -> Result<(), ClientError> {
        self.wait(timeout, "head", |replica| replica.head() >= head)
    }

    /// Closes the connection politely.
    pub fn close(mut self) {
        if let Some(socket) = self.socket.as_mut() {
            let _ = socket.close(None);
            let _ = socket.flush();
        }
    }

    /// The document's visible text.
    pub fn text(&self) -> String {
        self.replica.text()
    }

    /// Last `server_seq` seen.
    pub fn head(&self) -> u64 {
        self.replica.head()
    }

    /// This client's replica id.
    pub fn replica(&self) -> u64 {
        self.replica.replica().unwrap_or(0)
    }

    /// The document's epoch.
    pub fn epoch(&self) -> &str {
        self.replica.epoch().unwrap_or("")
    }

    /// The replica state machine (pending count, presence, the CRDT).
    pub fn state(&self) -> &Replica {
        &self.replica
    }

    /// The close code and reason the server sent, once it closed the connection.
    pub fn close_reason(&self) -> Option<(Option<u16>, &str)> {
        self.closed
            .as_ref()
            .map(|(code, reason)| (*code, reason.as_str()))
    }
}

#[cfg(test)]
mod tests {
    //! The blocking client against a minimal single-threaded server in the test (one room,
    //! non-blocking sockets polled in a loop). The real server's socket tests live in `tests/it`.

    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread;

    use super::*;
    use crate::ids::ConnToken;
    use crate::protocol::{parse_client_message, ClientMessage};
    use crate::room::{Room, RoomConfig};
    use tungstenite::protocol::frame::coding::CloseCode;
    use tungstenite::protocol::CloseFrame;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// Serves one document on `127.0.0.1:0` until dropped.
    struct TinyServer {
        url: String,
        stop: Arc<AtomicBool>,
        thread: Option<thread::JoinHandle<()>>,
    }

    impl Drop for TinyServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    fn serve() -> TinyServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = thread::spawn(move || {
            let config = RoomConfig {
                snapshot_every_ops: 1_000,
                snapshot_every_bytes: 1 << 30,
                replay_window_ops: 100,
                doc_chars_max: 1_000_000,
            };
            let mut room = Room::open("d".into(), None, config).expect("room");
            let mut sockets: Vec<(ConnToken, WebSocket<TcpStream>)> = Vec::new();
            let mut next = 0;
            // Watchdog: the server never outlives a minute even if the test forgets it.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop_flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((stream, _)) = listener.accept() {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(TIMEOUT));
                    if let Ok(socket) = tungstenite::accept(stream) {
                        let _ = socket.get_ref().set_nonblocking(true);
                        next += 1;
                        sockets.push((ConnToken(next), socket));
                    }
                }
                let mut gone = Vec::new();
                for (conn, socket) in &mut sockets {
                    match socket.read() {
                        Ok(Message::Text(text)) => match parse_client_message(&text) {
                            Ok(ClientMessage::Hello(hello)) => room.join(*conn, &hello),
                            Ok(ClientMessage::Op(msg)) => room.handle_op(*conn, msg),
                            Ok(ClientMessage::Presence(update)) => {
                                room.handle_presence(*conn, update)
                            }
                            Ok(ClientMessage::Auth(_)) => {}
                            Err(err) => room.refuse(*conn, &err),
                        },
                        Ok(_) => {}
                        Err(tungstenite::Error::Io(err))
                            if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => gone.push(*conn),
                    }
                }
                let effects = room.take_effects();
                for (conn, frame) in effects.frames {
                    if let Some((_, socket)) = sockets.iter_mut().find(|(c, _)| *c == conn) {
                        let _ = socket.send(Message::Text(frame));
                    }
                }
                for (conn, code, reason) in effects.closes {
                    if let Some((_, socket)) = sockets.iter_mut().find(|(c, _)| *c == conn) {
                        let frame = CloseFrame {
                            code: CloseCode::from(code),
                            reason: reason.into(),
                        };
                        let _ = socket.close(Some(frame));
                        let _ = socket.flush();
                    }
                    gone.push(conn);
                }
                for conn in gone {
                    room.leave(conn);
                    sockets.retain(|(c, _)| *c != conn);
                }
                for (_, socket) in &mut sockets {
                    let _ = socket.flush();
                }
                thread::sleep(Duration::from_millis(1));
            }
        });
        TinyServer {
            url,
            stop,
            thread: Some(thread),
        }
    }

    fn options() -> ClientOptions {
        ClientOptions {
            timeout: TIMEOUT,
            ..ClientOptions::default()
        }
    }

    #[test]
    fn edits_reach_everyone_and_survive_reconnects() {
        let server = serve();
        let mut a = Client::connect(&server.url, "d", options()).expect("connect a");
        let mut b = Client::connect(&server.url, "d", options()).expect("connect b");
        assert_eq!((a.replica(), b.replica()), (1, 2));
        a.insert(0, "hello").expect("insert");
        a.wait_until_acked(TIMEOUT).expect("acked");
        b.wait_for_head(1, TIMEOUT).expect("b sees it");
        assert_eq!(b.text(), "hello");
        // Joins and waits queue the events they read; poll returns them first.
        let joined = Event::Joined {
            replica: 1,
            head: 0,
            snapshot: true,
            history_lost: false,
            resend: vec![],
        };
        assert_eq!(
            a.take_events(),
            vec![
                joined,
                Event::Acked {
                    client_seq: 1,
                    server_seq: 1
                }
            ]
        );
        b.set_presence(r#"{"cursor":5}"#).expect("presence");
        let events = a.poll(TIMEOUT).expect("poll");
        assert_eq!(
            events,
            vec![Event::Presence {
                replica: 2,
                state_json: r#"{"cursor":5}"#.into()
            }]
        );
        // a edits while disconnected, then reconnects with since and resends.
        a.drop_connection();
        assert!(
            a.insert(5, "!").is_err(),
            "no connection: the edit stays pending"
        );
        b.delete(0, 1).expect("delete");
        b.wait_until_acked(TIMEOUT).expect("acked");
        a.reconnect().expect("reconnect");
        a.wait_until_acked(TIMEOUT).expect("resend acked");
        b.wait_for_head(3, TIMEOUT).expect("b sees the resend");
        assert_eq!(a.text(), "ello!");
        assert_eq!(b.text(), "ello!");
        assert_eq!(
            a.state().presence().get(&2).map(String::as_str),
            Some(r#"{"cursor":5}"#)
        );
        // Taking over a's replica closes a with 1008 "replaced".
        let mut again = Client::connect(
            &server.url,
            "d",
            ClientOptions {
                replica: Some(1),
                ..options()
            },
        )
        .expect("takeover");
        assert_eq!(again.text(), "ello!");
        let closed = loop {
            match a.poll(TIMEOUT) {
                Err(ClientError::Closed { code, reason }) => break (code, reason),
                Ok(events) if events.is_empty() => panic!("no close within the timeout"),
                Ok(_) => continue,
                Err(err) => panic!("unexpected {err}"),
            }
        };
        assert_eq!(closed, (Some(1008), "replaced".to_string()));
        again.insert(0, "h").expect("insert");
        again.wait_until_acked(TIMEOUT).expect("acked");
        assert_eq!(again.text(), "hello!");
        b.close();
        // A server that lost the document (another process, new epoch): the client resends its
        // own acknowledged edits that the new snapshot lacks.
        let other = serve();
        again.reconnect_to(&other.url).expect("reconnect elsewhere");
        let lost = again.take_events().into_iter().any(|e| {
            matches!(
                e,
                Event::Joined {
                    history_lost: true,
                    ..
                }
            )
        });
        assert!(lost);
        again.wait_until_acked(TIMEOUT).expect("resend acked");
        assert_eq!(again.text(), "h");
        let mut fresh = Client::connect(&other.url, "d", options()).expect("connect");
        fresh.wait_for_head(1, TIMEOUT).expect("joined at head 1");
        assert_eq!(fresh.text(), "h");
        again.close();
    }
}
