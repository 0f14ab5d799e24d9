//! The few bytes of the WebSocket and HTTP wire the relay writes or looks at: its bounded byte
//! queue, the frame-boundary tracker (frame headers only, never a payload), and the frames and
//! answers it sends itself (a close, `unavailable`, the `101` of a handshake it answers).
//! Pure: no sockets.

use super::{RELAY_BUFFER_BYTES, RELAY_CLOSE_REASON};
use crate::protocol::{self, ErrorCode, ProtocolError};

/// A fixed-capacity byte queue: bytes are appended at `end` and taken from `start`.
pub(super) struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    pub(super) fn new() -> Buf {
        Buf {
            data: vec![0; RELAY_BUFFER_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Room to read into, moving the held bytes to the front first when that makes room.
    pub(super) fn spare(&mut self) -> &mut [u8] {
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }

    pub(super) fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.data.len());
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

/// The boundaries of the WebSocket frames the owner sends, from their headers alone.
#[derive(Debug, Default)]
pub(super) struct FrameTracker {
    header: [u8; 14],
    header_len: usize,
    payload_left: u64,
    /// The owner sent a close frame: its end of the session is orderly.
    pub(super) close_seen: bool,
}

impl FrameTracker {
    /// Bytes of the header starting `header[..2]` (base, extended length, mask key).
    fn header_bytes(first_two: [u8; 2]) -> usize {
        let ext = match first_two[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if first_two[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    pub(super) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = (bytes.len() as u64).min(self.payload_left);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            self.header[self.header_len] = bytes[0];
            self.header_len += 1;
            bytes = &bytes[1..];
            if self.header_len < 2 {
                continue;
            }
            let need = Self::header_bytes([self.header[0], self.header[1]]);
            if self.header_len < need {
                continue;
            }
            let payload = match self.header[1] & 0x7f {
                126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                127 => {
                    let mut len = [0u8; 8];
                    len.copy_from_slice(&self.header[2..10]);
                    u64::from_be_bytes(len)
                }
                n => u64::from(n),
            };
            if self.header[0] & 0x0f == 0x8 {
                self.close_seen = true;
            }
            self.payload_left = payload;
            self.header_len = 0;
        }
    }

    pub(super) fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }
}

/// A server-to-client WebSocket frame: FIN, `opcode`, unmasked.
pub fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

/// A close frame with `code` and `reason` (at most 123 bytes).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    server_frame(0x8, &payload)
}

/// The frames of a refusal after the upgrade: `unavailable` with `message`, then close 1013.
pub fn unavailable_frames(message: &'static str) -> Vec<u8> {
    let err = ProtocolError::new(ErrorCode::Unavailable, message);
    let mut out = server_frame(0x1, protocol::encode_error(&err).as_bytes());
    out.extend_from_slice(&close_frame(1013, RELAY_CLOSE_REASON));
    out
}

/// The `101` answering a WebSocket upgrade whose key is `key`.
pub fn switching_protocols(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(bytes: &[u8]) -> FrameTracker {
        let mut tracker = FrameTracker::default();
        tracker.feed(bytes);
        tracker
    }

    #[test]
    fn frame_tracker_finds_boundaries_in_any_split() {
        let mut stream = server_frame(0x1, b"hello");
        stream.extend_from_slice(&server_frame(0x2, &[7u8; 300]));
        stream.extend_from_slice(&server_frame(0x1, &vec![b'x'; 70_000]));
        let boundaries = [0, 7, 7 + 4 + 300, stream.len()];
        for split in 0..stream.len().min(400) {
            let mut tracker = FrameTracker::default();
            tracker.feed(&stream[..split]);
            assert_eq!(
                tracker.at_boundary(),
                boundaries.contains(&split),
                "split {split}"
            );
            tracker.feed(&stream[split..]);
            assert!(tracker.at_boundary());
            assert!(!tracker.close_seen);
        }
    }

    #[test]
    fn frame_tracker_sees_a_close_and_a_masked_header() {
        assert!(tracked(&close_frame(1000, "bye")).close_seen);
        // A masked frame (as a client sends): 4 mask bytes after the length.
        let masked = [0x81, 0x83, 1, 2, 3, 4, b'a', b'b', b'c'];
        let tracker = tracked(&masked);
        assert!(tracker.at_boundary());
        assert!(!tracked(&masked[..8]).at_boundary());
    }

    #[test]
    fn buf_moves_its_bytes_to_make_room() {
        let mut buf = Buf::new();
        let n = buf.spare().len();
        assert_eq!(n, RELAY_BUFFER_BYTES);
        buf.filled(n);
        assert!(buf.spare().is_empty());
        buf.consume(10);
        assert_eq!(buf.spare().len(), 10);
        assert_eq!(buf.len(), RELAY_BUFFER_BYTES - 10);
        buf.consume(buf.len());
        assert!(buf.is_empty());
        assert_eq!(buf.spare().len(), RELAY_BUFFER_BYTES);
    }

    #[test]
    fn the_relay_answers_a_handshake_with_the_clients_accept_key() {
        let answer = String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==")).unwrap();
        assert!(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        let frames = unavailable_frames("x");
        assert_eq!(frames[0], 0x81);
        assert!(tracked(&frames).close_seen);
    }
}
