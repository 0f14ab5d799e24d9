//! The demo editor and the JavaScript client, embedded in the binary and served over plain HTTP.
//!
//! Owns the table from request path to embedded file. It must never touch the file system at
//! run time: every body is compiled in with `include_bytes!`, so the binary is the whole app.

/// A file embedded in the binary, served by the acceptor over plain HTTP.
#[derive(Clone, Copy, Debug)]
pub struct StaticPage {
    /// The `Content-Type` header value.
    pub content_type: &'static str,
    /// The file's bytes.
    pub body: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

/// Request paths and their files. `/collab.js` is the client library itself, so that any page
/// served from here (or a user's own) can `import` it.
const PAGES: &[(&str, &str, &[u8])] = &[
    ("/", HTML, include_bytes!("../../clients/demo/index.html")),
    (
        "/index.html",
        HTML,
        include_bytes!("../../clients/demo/index.html"),
    ),
    (
        "/app.css",
        CSS,
        include_bytes!("../../clients/demo/app.css"),
    ),
    ("/app.js", JS, include_bytes!("../../clients/demo/app.js")),
    (
        "/collab.js",
        JS,
        include_bytes!("../../clients/js/collab.js"),
    ),
];

/// The embedded page for a request path without its query ("/", "/app.js", "/collab.js", ...), or None.
pub fn lookup(path: &str) -> Option<StaticPage> {
    PAGES
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|&(_, content_type, body)| StaticPage { content_type, body })
}

#[cfg(test)]
mod tests {
    use super::lookup;

    fn check(path: &str, expected: Option<(&str, &str)>) {
        let got = lookup(path);
        match expected {
            None => assert!(got.is_none(), "{path} should not be served"),
            Some((content_type, needle)) => {
                let page = got.unwrap_or_else(|| panic!("{path} should be served"));
                assert_eq!(page.content_type, content_type, "{path}");
                let body = std::str::from_utf8(page.body).expect("embedded files are UTF-8");
                assert!(body.contains(needle), "{path} should contain {needle:?}");
            }
        }
    }

    #[test]
    fn serves_the_demo_and_the_client() {
        check("/", Some((super::HTML, "<textarea id=\"editor\"")));
        check("/index.html", Some((super::HTML, "/app.js")));
        check("/app.css", Some((super::CSS, "#editor")));
        check(
            "/app.js",
            Some((
                super::JS,
                "import { CollabClient, TextareaBinding } from '/collab.js'",
            )),
        );
        check("/collab.js", Some((super::JS, "export class CollabClient")));
        check("/missing", None);
        check("/app.js?v=1", None);
        check("", None);
        check("/../Cargo.toml", None);
    }
}
