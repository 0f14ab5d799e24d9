//! [`Room`]: one document's state and the contract's per-document rules.

use tungstenite::Utf8Bytes;

use crate::ids::ConnToken;
use crate::protocol::{Hello, OpMessage, PresenceUpdate, ProtocolError};
use crate::storage::{LogRecord, StoredDoc, StoredSnapshot};

/// Limits a room enforces, from `Config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomConfig {
    /// A snapshot is due after this many accepted op messages since the last one.
    pub snapshot_every_ops: u64,
    /// A snapshot is due after this many bytes of echoes since the last one.
    pub snapshot_every_bytes: u64,
    /// Echoes kept in memory to answer `since` with a replay.
    pub replay_window_ops: usize,
    /// Largest document in characters, tombstones included.
    pub doc_chars_max: usize,
    /// Required `hello.token`, if any.
    pub token: Option<String>,
}

impl RoomConfig {
    /// The room limits of a server configuration.
    pub fn from_config(config: &crate::config::Config) -> RoomConfig {
        RoomConfig {
            snapshot_every_ops: config.snapshot_every_ops,
            snapshot_every_bytes: config.snapshot_every_bytes,
            replay_window_ops: config.replay_window_ops,
            doc_chars_max: config.doc_chars_max,
            token: config.token.clone(),
        }
    }
}

/// What a room wants done; the shard drains it ([`Room::take_effects`]) at the end of each loop turn.
#[derive(Debug, Default)]
pub struct Effects {
    /// Text frames in order per connection. The shard holds ALL of them until `records` are
    /// durable (append each record, then one sync for the whole turn), then queues them.
    pub frames: Vec<(ConnToken, Utf8Bytes)>,
    /// Connections to close after their frames are flushed: (conn, close code, reason).
    pub closes: Vec<(ConnToken, u16, &'static str)>,
    /// Log records to append, in order, before any frame of this turn is released.
    pub records: Vec<LogRecord>,
    /// (origin conn, client_seq) of every op message covered by `records`: if the sync fails the
    /// shard answers each origin `unavailable` (with its client_seq) instead of the echo.
    pub op_origins: Vec<(ConnToken, u64)>,
    /// A snapshot the room wants written, after this turn's records are durable.
    pub snapshot: Option<StoredSnapshot>,
}

/// Why a room could not be opened from storage.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    /// Stored data did not decode or integrate; the shard answers `unavailable`.
    #[error("stored document is corrupt: {0}")]
    Corrupt(&'static str),
}

/// One document in memory.
#[derive(Debug)]
pub struct Room {
    doc_name: String,
    epoch: String,
    head: u64,
}

impl Room {
    /// Opens a document from what storage loaded (`None`: a new document with a fresh epoch).
    ///
    /// # Errors
    /// `Corrupt` when stored data does not decode or integrate.
    pub fn open(
        doc: String,
        stored: Option<StoredDoc>,
        config: RoomConfig,
    ) -> Result<Room, RoomError> {
        let _ = (stored, config);
        Ok(Room {
            doc_name: doc,
            epoch: String::from("todo"),
            head: 0,
        })
    }

    /// A connection joins with a validated hello (doc already matched by the shard).
    pub fn join(&mut self, conn: ConnToken, hello: &Hello) {
        let _ = (conn, hello);
        todo!()
    }

    /// An op message from a joined connection.
    pub fn handle_op(&mut self, conn: ConnToken, msg: OpMessage) {
        let _ = (conn, msg);
        todo!()
    }

    /// A presence update: relayed to the others, remembered for `hello_ack` lists.
    pub fn handle_presence(&mut self, conn: ConnToken, update: PresenceUpdate) {
        let _ = (conn, update);
        todo!()
    }

    /// A refused message from a joined connection: error frame to it, in order.
    pub fn refuse(&mut self, conn: ConnToken, err: &ProtocolError) {
        let _ = (conn, err);
        todo!()
    }

    /// The connection left. Idempotent.
    pub fn leave(&mut self, conn: ConnToken) {
        let _ = conn;
        todo!()
    }

    /// Drains what this room wants done since the last call.
    pub fn take_effects(&mut self) -> Effects {
        todo!()
    }

    /// Whether [`Room::take_effects`] would return something.
    pub fn has_effects(&self) -> bool {
        todo!()
    }

    /// Connected clients.
    pub fn n_clients(&self) -> usize {
        todo!()
    }

    /// `server_seq` of the last accepted op message (0 for none).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The document's epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The document's name.
    pub fn doc_name(&self) -> &str {
        &self.doc_name
    }
}
