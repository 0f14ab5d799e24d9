//! The byte transport under a shard's WebSockets: the TCP socket the acceptor handed over, or
//! a simulated socket of [`crate::sim`] (so the simulator runs the real [`super::Net`]).
//!
//! Everything [`super::Net`] does to a socket goes through [`ShardWs`]: tungstenite's calls
//! (which read and write control frames), raw vectored writes of data frames, raw reads while
//! draining a broken connection, a write shutdown, and readiness registration. A TCP socket
//! registers with the shard's mio `Registry`; a simulated one records its token and interest
//! and reports readiness to the simulated shard's event queue ([`crate::sim::socket`]).

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::{Message, WebSocket};

use crate::sim::socket::SimSocket;

/// One connection's WebSocket over its transport.
pub(crate) enum ShardWs {
    /// A real TCP connection (the server).
    Tcp(WebSocket<TcpStream>),
    /// A simulated connection (the deterministic simulator).
    Sim(WebSocket<SimSocket>),
}

/// Calls the same method on whichever WebSocket `$ws` holds.
macro_rules! both {
    ($ws:expr, $w:ident => $call:expr) => {
        match $ws {
            ShardWs::Tcp($w) => $call,
            ShardWs::Sim($w) => $call,
        }
    };
}

impl ShardWs {
    /// tungstenite's `read`: the next message (control frames are answered by tungstenite).
    pub(crate) fn read(&mut self) -> tungstenite::Result<Message> {
        both!(self, ws => ws.read())
    }

    /// tungstenite's `write` (control frames only: data frames go through [`Self::raw`]).
    pub(crate) fn write(&mut self, message: Message) -> tungstenite::Result<()> {
        both!(self, ws => ws.write(message))
    }

    /// tungstenite's `flush`.
    pub(crate) fn flush(&mut self) -> tungstenite::Result<()> {
        both!(self, ws => ws.flush())
    }

    /// tungstenite's `close`.
    pub(crate) fn close(&mut self, frame: Option<CloseFrame>) -> tungstenite::Result<()> {
        both!(self, ws => ws.close(frame))
    }

    /// Reads raw bytes from the socket, past tungstenite (draining a broken connection).
    pub(crate) fn read_raw(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        both!(self, ws => ws.get_mut().read(buf))
    }

    /// The socket as a plain writer for data frames, past tungstenite: `sendmsg` with
    /// `MSG_NOSIGNAL` for TCP.
    pub(crate) fn raw(&mut self) -> RawWriter<'_> {
        RawWriter(self)
    }

    /// Shuts down the writing half of the socket.
    pub(crate) fn shutdown_write(&mut self) {
        match self {
            ShardWs::Tcp(ws) => {
                let _ = ws.get_mut().shutdown(Shutdown::Write);
            }
            ShardWs::Sim(ws) => ws.get_mut().shutdown_write(),
        }
    }

    /// Registers for readiness under `token`.
    pub(crate) fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        match self {
            ShardWs::Tcp(ws) => registry.register(ws.get_mut(), token, interest),
            ShardWs::Sim(ws) => {
                ws.get_mut().register(token.0, interest);
                Ok(())
            }
        }
    }

    /// Changes the readiness interest.
    pub(crate) fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        match self {
            ShardWs::Tcp(ws) => registry.reregister(ws.get_mut(), token, interest),
            ShardWs::Sim(ws) => {
                ws.get_mut().register(token.0, interest);
                Ok(())
            }
        }
    }

    /// Stops readiness reports.
    pub(crate) fn deregister(&mut self, registry: &Registry) {
        match self {
            ShardWs::Tcp(ws) => {
                let _ = registry.deregister(ws.get_mut());
            }
            ShardWs::Sim(ws) => ws.get_mut().deregister(),
        }
    }

    /// The TCP socket, if it is one.
    pub(crate) fn tcp(&self) -> Option<&TcpStream> {
        match self {
            ShardWs::Tcp(ws) => Some(ws.get_ref()),
            ShardWs::Sim(_) => None,
        }
    }
}

/// A connection's socket as a [`Write`] for data frames (see [`ShardWs::raw`]).
pub(crate) struct RawWriter<'a>(&'a mut ShardWs);

impl Write for RawWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.0 {
            ShardWs::Tcp(ws) => NoSigPipe(ws.get_ref()).write_vectored(bufs),
            ShardWs::Sim(ws) => ws.get_mut().write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TCP socket written with `sendmsg(MSG_NOSIGNAL)`: a peer gone mid-write is an `EPIPE`
/// error, never a SIGPIPE, whatever the process's signal disposition (std's `write_vectored`
/// is a plain `writev`, safe only because Rust binaries ignore SIGPIPE by default).
struct NoSigPipe<'a>(&'a TcpStream);

impl Write for NoSigPipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: `msghdr` is plain data and all-zero is a valid value (no address, no
        // control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // `IoSlice` is guaranteed ABI-compatible with `iovec` on Unix; sendmsg only reads it.
        msg.msg_iov = bufs.as_ptr().cast_mut().cast::<libc::iovec>();
        msg.msg_iovlen = bufs.len() as _;
        // SAFETY: the fd is the connection's open socket, and `msg` points at `bufs.len()`
        // valid iovecs that outlive the call.
        let n = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
