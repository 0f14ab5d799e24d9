//! Simulated stream sockets: a [`SimSocket`] pair is a full-duplex byte pipe with a bounded
//! buffer per direction, partial reads and writes drawn from a seeded RNG, end of input,
//! resets, and edge-style readiness reports to a simulated shard's [`SimPoll`].
//!
//! The server end is handed to the real [`crate::shard::Net`] (through
//! [`crate::shard::Net::insert_sim`]) and behaves as a non-blocking TCP socket does for it:
//! `WouldBlock` when the buffer is empty (read) or full (write), `Ok(0)` at the end of input,
//! `BrokenPipe` or `ConnectionReset` once the peer is gone. Readiness follows epoll's
//! edge-triggered rules closely enough for the connection layer: an event when bytes arrive
//! (or the input ends), when a writer that was refused can write again, and at registration
//! for what is already ready. Everything is single-threaded in the simulator; the lock only
//! makes the type `Send`, as the connection layer's sockets are.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use mio::Interest;

use super::rng::SimRng;

/// A readiness report for one registered socket: (token, readable, writable).
pub type Ready = (usize, bool, bool);

/// The readiness queue of one simulated shard, filled by its sockets.
#[derive(Clone, Debug, Default)]
pub struct SimPoll {
    events: Arc<Mutex<Vec<Ready>>>,
}

impl SimPoll {
    /// An empty queue.
    pub fn new() -> SimPoll {
        SimPoll::default()
    }

    /// Takes every report queued since the last call, in order.
    pub fn take(&self) -> Vec<Ready> {
        std::mem::take(&mut *lock(&self.events))
    }

    fn push(&self, ready: Ready) {
        lock(&self.events).push(ready);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Single-threaded: a poisoned lock only means an earlier assertion failed.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How a link shapes its traffic (drawn per link by the simulator).
#[derive(Clone, Copy, Debug)]
pub struct LinkShape {
    /// Bytes a direction buffers before writes would block (the socket buffers of both ends).
    pub buffer_bytes: usize,
    /// A read or a write moves at most this many bytes (at least 1); each call draws a size
    /// in `1..=chunk_max`.
    pub chunk_max: usize,
}

/// One direction of a link.
#[derive(Debug, Default)]
struct Pipe {
    buf: VecDeque<u8>,
    /// The writer shut down or went away: after `buf`, the reader sees the end.
    eof: bool,
    /// The reader went away: writes fail.
    reader_gone: bool,
    /// Reset: reads and writes fail at once, whatever is buffered.
    reset: bool,
    /// The writer was refused (buffer full) since it last wrote: it gets a writable report
    /// when the reader makes room.
    writer_refused: bool,
}

/// One end's registration.
#[derive(Debug, Default)]
struct Registration {
    token: Option<usize>,
    readable: bool,
    writable: bool,
}

#[derive(Debug)]
struct Link {
    /// `pipes[side]` carries the bytes written by `side`.
    pipes: [Pipe; 2],
    regs: [Registration; 2],
    /// Where each end reports readiness (only the server end has one).
    polls: [Option<SimPoll>; 2],
    shape: LinkShape,
    rng: SimRng,
}

impl Link {
    fn chunk(&mut self, want: usize) -> usize {
        let max = self.shape.chunk_max.max(1);
        want.min(1 + self.rng.below(max as u64) as usize)
    }

    fn readable_now(&self, side: usize) -> bool {
        let pipe = &self.pipes[1 - side];
        !pipe.buf.is_empty() || pipe.eof || pipe.reset
    }

    fn writable_now(&self, side: usize) -> bool {
        let pipe = &self.pipes[side];
        pipe.buf.len() < self.shape.buffer_bytes || pipe.reader_gone || pipe.reset
    }

    /// Reports to `side`'s poll, if it registered the interest.
    fn notify(&self, side: usize, readable: bool, writable: bool) {
        let reg = &self.regs[side];
        let (Some(token), Some(poll)) = (reg.token, &self.polls[side]) else {
            return;
        };
        let readable = readable && reg.readable;
        let writable = writable && reg.writable;
        if readable || writable {
            poll.push((token, readable, writable));
        }
    }
}

/// One end of a simulated connection.
#[derive(Debug)]
pub struct SimSocket {
    end: Box<End>,
}

#[derive(Debug)]
struct End {
    link: Arc<Mutex<Link>>,
    side: usize,
}

impl SimSocket {
    /// A connected pair: `(server end, client end)`. The server end reports readiness to
    /// `poll`; `seed` drives the partial reads and writes of both.
    pub fn pair(poll: SimPoll, shape: LinkShape, seed: u64) -> (SimSocket, SimSocket) {
        let link = Arc::new(Mutex::new(Link {
            pipes: [Pipe::default(), Pipe::default()],
            regs: [Registration::default(), Registration::default()],
            polls: [Some(poll), None],
            shape,
            rng: SimRng::new(seed),
        }));
        let server = SimSocket {
            end: Box::new(End {
                link: link.clone(),
                side: 0,
            }),
        };
        let client = SimSocket {
            end: Box::new(End { link, side: 1 }),
        };
        (server, client)
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        lock(&self.end.link)
    }

    /// Registers (or re-registers) for readiness under `token`; reports what is ready now.
    pub fn register(&mut self, token: usize, interest: Interest) {
        let side = self.end.side;
        let mut link = self.link();
        link.regs[side] = Registration {
            token: Some(token),
            readable: interest.is_readable(),
            writable: interest.is_writable(),
        };
        let (readable, writable) = (link.readable_now(side), link.writable_now(side));
        link.notify(side, readable, writable);
    }

    /// Stops readiness reports.
    pub fn deregister(&mut self) {
        let side = self.end.side;
        self.link().regs[side] = Registration::default();
    }

    /// Shuts down this end's writing half: the peer reads the end after what is buffered.
    pub fn shutdown_write(&mut self) {
        let side = self.end.side;
        let mut link = self.link();
        link.pipes[side].eof = true;
        link.notify(1 - side, true, false);
    }

    /// Resets the connection (a peer that vanished without a FIN): both ends fail at once.
    pub fn reset(&mut self) {
        let side = self.end.side;
        let mut link = self.link();
        link.pipes[0].reset = true;
        link.pipes[1].reset = true;
        link.notify(1 - side, true, true);
    }

    /// Bytes written by this end that the peer has not read yet.
    pub fn unread_by_peer(&self) -> usize {
        let side = self.end.side;
        self.link().pipes[side].buf.len()
    }

    /// Bytes written by the peer that this end has not read yet.
    pub fn unread_here(&self) -> usize {
        let side = self.end.side;
        self.link().pipes[1 - side].buf.len()
    }
}

impl Drop for SimSocket {
    /// Closing a socket: the peer reads the end of input; its writes fail.
    fn drop(&mut self) {
        let side = self.end.side;
        let mut link = self.link();
        link.pipes[side].eof = true;
        link.pipes[1 - side].reader_gone = true;
        link.regs[side] = Registration::default();
        link.notify(1 - side, true, true);
    }
}

impl Read for SimSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let side = self.end.side;
        let mut link = self.link();
        let pipe = &link.pipes[1 - side];
        if pipe.reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if pipe.buf.is_empty() {
            if pipe.eof {
                return Ok(0);
            }
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let want = buf.len().min(pipe.buf.len());
        let n = link.chunk(want);
        let pipe = &mut link.pipes[1 - side];
        for (slot, byte) in buf.iter_mut().zip(pipe.buf.drain(..n)) {
            *slot = byte;
        }
        if std::mem::take(&mut pipe.writer_refused) {
            link.notify(1 - side, false, true);
        }
        Ok(n)
    }
}

impl Write for SimSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let side = self.end.side;
        let mut link = self.link();
        let buffer_bytes = link.shape.buffer_bytes;
        let pipe = &mut link.pipes[side];
        if pipe.reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        if pipe.reader_gone || pipe.eof {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let space = buffer_bytes.saturating_sub(pipe.buf.len());
        if space == 0 {
            pipe.writer_refused = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = link.chunk(total.min(space));
        let pipe = &mut link.pipes[side];
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = b.len().min(left);
            pipe.buf.extend(&b[..take]);
            left -= take;
        }
        link.notify(1 - side, true, false);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> LinkShape {
        LinkShape {
            buffer_bytes: 8,
            chunk_max: 3,
        }
    }

    #[test]
    fn bytes_arrive_in_order_in_pieces_and_block_when_full() {
        let poll = SimPoll::new();
        let (mut server, mut client) = SimSocket::pair(poll.clone(), shape(), 7);
        server.register(5, Interest::READABLE);
        assert!(poll.take().is_empty(), "nothing to read yet");
        let mut sent = 0;
        let data = b"0123456789abcdef";
        loop {
            match client.write(&data[sent..]) {
                Ok(n) => sent += n,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    break;
                }
            }
        }
        assert_eq!(sent, 8, "the buffer holds 8 bytes");
        assert!(poll.take().iter().all(|&(token, r, _)| token == 5 && r));
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while let Ok(n) = server.read(&mut buf) {
            assert!((1..=3).contains(&n), "partial reads");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&got, &data[..8]);
        drop(client);
        assert_eq!(server.read(&mut buf).expect("end of input"), 0);
        assert_eq!(
            server.write(b"x").expect_err("peer gone").kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[test]
    fn a_refused_writer_hears_when_room_is_made() {
        let poll = SimPoll::new();
        let (mut server, mut client) = SimSocket::pair(poll.clone(), shape(), 1);
        server.register(2, Interest::READABLE | Interest::WRITABLE);
        poll.take();
        while server.write(b"abcdefgh").is_ok() {}
        assert!(poll.take().is_empty());
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).expect("a byte"), 1);
        assert_eq!(poll.take(), vec![(2, false, true)]);
    }
}
