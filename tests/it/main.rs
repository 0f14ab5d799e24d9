//! Integration tests: real servers on 127.0.0.1:0, real WebSocket clients, a watchdog per test.

mod echo;
mod hostile;
mod http;
mod util;
mod ws;
