//! One client's WebSocket over a non-blocking mio socket: TCP connect (optionally from a chosen
//! source address), tungstenite's resumable client handshake, then text frames in and out.
//!
//! Owns the transport only: it never parses a protocol message and never blocks.

use std::io;
use std::net::{IpAddr, SocketAddr};

use mio::net::TcpStream;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, Utf8Bytes, WebSocket};

/// Why a connection failed or ended; the report counts them by [`ConnError::kind`].
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Creating, binding or connecting the socket failed.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// The HTTP upgrade failed.
    #[error("handshake: {0}")]
    Handshake(tungstenite::Error),
    /// The server sent a close frame (code, or 1005 when it had none).
    #[error("closed by server with {0}")]
    ClosedByServer(u16),
    /// The socket ended or broke without a close frame.
    #[error("socket: {0}")]
    Io(io::Error),
    /// A WebSocket protocol violation.
    #[error("websocket: {0}")]
    Ws(tungstenite::Error),
}

impl ConnError {
    /// A short stable name for counting.
    pub fn kind(&self) -> String {
        match self {
            ConnError::Connect(e) => format!("connect_{:?}", e.kind()).to_lowercase(),
            ConnError::Handshake(_) => "handshake".into(),
            ConnError::ClosedByServer(code) => format!("closed_{code}"),
            ConnError::Io(e) => format!("io_{:?}", e.kind()).to_lowercase(),
            ConnError::Ws(_) => "websocket".into(),
        }
    }
}

/// Opens a non-blocking TCP connection to `server`, from `source` when given (port chosen at
/// connect time, so each source address has its own ephemeral port range).
///
/// # Errors
/// The socket, bind or connect call failed (`EINPROGRESS` is not a failure).
pub fn connect(server: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(server);
    };
    let (IpAddr::V4(source), SocketAddr::V4(server)) = (source, server) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--bind needs IPv4 source and server",
        ));
    };
    // SAFETY: plain socket syscalls on a descriptor this function owns until it is handed to
    // `std::net::TcpStream`, which closes it on drop; every return value is checked.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let one: libc::c_int = 1;
        // Best effort: lets connect() pick the port per 4-tuple instead of bind() per address.
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip.octets()),
            },
            sin_zero: [0; 8],
        };
        let local = sockaddr(source, 0);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sockaddr(*server.ip(), server.port());
        if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err);
            }
        }
        Ok(TcpStream::from_std(stream))
    }
}

/// What a readiness event did to a connection.
#[derive(Debug)]
pub enum Progress {
    /// Nothing new (still connecting, or a spurious wake-up).
    Pending,
    /// The WebSocket just opened: send `hello` now.
    Opened,
}

/// The transport states of one client.
pub enum WsConn {
    /// TCP connect in flight.
    Connecting(TcpStream, String),
    /// HTTP upgrade in flight.
    Handshaking(Box<MidHandshake<ClientHandshake<TcpStream>>>),
    /// Open WebSocket.
    Open(Box<WebSocket<TcpStream>>),
    /// Finished (failed, closed or dropped).
    Closed,
}

/// Buffers small on purpose: the generator holds tens of thousands of these.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

impl WsConn {
    /// A connection whose TCP connect is in flight; `url` is the full `ws://` URL to upgrade.
    pub fn new(stream: TcpStream, url: String) -> WsConn {
        WsConn::Connecting(stream, url)
    }

    /// The socket, for (de)registration with the poll.
    pub fn stream_mut(&mut self) -> Option<&mut TcpStream> {
        match self {
            WsConn::Connecting(stream, _) => Some(stream),
            WsConn::Handshaking(mid) => Some(mid.get_mut().get_mut()),
            WsConn::Open(ws) => Some(ws.get_mut()),
            WsConn::Closed => None,
        }
    }

    /// Whether frames can be sent.
    pub fn is_open(&self) -> bool {
        matches!(self, WsConn::Open(_))
    }

    /// Advances connect and handshake after a readiness event.
    ///
    /// # Errors
    /// The connection failed; it is now [`WsConn::Closed`].
    pub fn advance(&mut self) -> Result<Progress, ConnError> {
        loop {
            match std::mem::replace(self, WsConn::Closed) {
                WsConn::Connecting(stream, url) => {
                    if let Some(err) = stream.take_error().map_err(ConnError::Connect)? {
                        return Err(ConnError::Connect(err));
                    }
                    match stream.peer_addr() {
                        Ok(_) => {}
                        Err(e)
                            if e.kind() == io::ErrorKind::NotConnected
                                || e.raw_os_error() == Some(libc::EINPROGRESS) =>
                        {
                            *self = WsConn::Connecting(stream, url);
                            return Ok(Progress::Pending);
                        }
                        Err(e) => return Err(ConnError::Connect(e)),
                    }
                    stream.set_nodelay(true).map_err(ConnError::Connect)?;
                    let request = url
                        .as_str()
                        .into_client_request()
                        .map_err(ConnError::Handshake)?;
                    let mid = ClientHandshake::start(stream, request, Some(ws_config()))
                        .map_err(ConnError::Handshake)?;
                    *self = WsConn::Handshaking(Box::new(mid));
                }
                WsConn::Handshaking(mid) => match mid.handshake() {
                    Ok((ws, _response)) => {
                        *self = WsConn::Open(Box::new(ws));
                        return Ok(Progress::Opened);
                    }
                    Err(HandshakeError::Interrupted(mid)) => {
                        *self = WsConn::Handshaking(Box::new(mid));
                        return Ok(Progress::Pending);
                    }
                    Err(HandshakeError::Failure(e)) => return Err(ConnError::Handshake(e)),
                },
                open @ WsConn::Open(_) => {
                    *self = open;
                    return Ok(Progress::Pending);
                }
                WsConn::Closed => return Ok(Progress::Pending),
            }
        }
    }

    /// Queues a text frame and tries to write it; a full socket keeps it queued for [`WsConn::flush`].
    ///
    /// # Errors
    /// The connection is broken or not open.
    pub fn send(&mut self, text: String) -> Result<(), ConnError> {
        let WsConn::Open(ws) = self else {
            return Err(ConnError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                "not open",
            )));
        };
        match ws.send(Message::text(text)) {
            Ok(()) => Ok(()),
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    /// Writes whatever is queued.
    ///
    /// # Errors
    /// The connection is broken.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        let WsConn::Open(ws) = self else {
            return Ok(());
        };
        match ws.flush() {
            Ok(()) => Ok(()),
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    /// Reads every complete text frame available now, calling `on_text` for each; stops at
    /// `WouldBlock`. Control frames are answered by tungstenite.
    ///
    /// # Errors
    /// The server closed the connection or it broke; frames read before that were delivered.
    pub fn read_texts(&mut self, mut on_text: impl FnMut(Utf8Bytes)) -> Result<(), ConnError> {
        let WsConn::Open(ws) = self else {
            return Ok(());
        };
        let mut close_code = None;
        loop {
            match ws.read() {
                Ok(Message::Text(text)) => on_text(text),
                Ok(Message::Close(frame)) => {
                    close_code = Some(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Err(ConnError::ClosedByServer(close_code.unwrap_or(1005)));
                }
                Err(e) => {
                    return Err(match close_code {
                        Some(code) => ConnError::ClosedByServer(code),
                        None => classify(e),
                    })
                }
            }
        }
        if let Some(code) = close_code {
            return Err(ConnError::ClosedByServer(code));
        }
        self.flush()
    }

    /// Starts a clean close (best effort) and forgets the socket.
    pub fn close(&mut self) {
        if let WsConn::Open(ws) = self {
            let _ = ws.close(None);
            let _ = ws.flush();
        }
        *self = WsConn::Closed;
    }
}

fn classify(e: tungstenite::Error) -> ConnError {
    match e {
        tungstenite::Error::Io(e) => ConnError::Io(e),
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            ConnError::ClosedByServer(1005)
        }
        other => ConnError::Ws(other),
    }
}
