//! Static pages served by the acceptor (placeholder until the browser client lands; the JS
//! engineer owns and replaces this file).
//!
//! Only compiled-in bytes: this module never touches the file system.

/// A page compiled into the binary.
#[derive(Clone, Copy, Debug)]
pub struct StaticPage {
    /// The `Content-Type` header value.
    pub content_type: &'static str,
    /// The body bytes.
    pub body: &'static [u8],
}

const INDEX: &[u8] = b"<!doctype html><meta charset=utf-8><title>collab-engine</title>\
<p>collab-engine is running. Connect a WebSocket to <code>/ws/&lt;doc&gt;</code>.</p>\n";

/// The page at `path`, if there is one.
pub fn lookup(path: &str) -> Option<StaticPage> {
    match path {
        "/" | "/index.html" => Some(StaticPage {
            content_type: "text/html; charset=utf-8",
            body: INDEX,
        }),
        _ => None,
    }
}
