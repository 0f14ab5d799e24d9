//! Any bytes a TCP peer can send the acceptor first: the request-head parser and the document
//! name decoder never panic, and a decoded name is 1 to 512 bytes of UTF-8.
#![no_main]

use collab_engine::acceptor::http::{decode_doc_name, parse_request, Parsed, Route};
use collab_engine::metrics::MetricsRegistry;
use libfuzzer_sys::fuzz_target;

/// One registry for every run: building one allocates every shard's histograms.
static METRICS: std::sync::OnceLock<MetricsRegistry> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let metrics = METRICS.get_or_init(|| MetricsRegistry::new(2));
    if let Parsed::Complete {
        head_bytes,
        route: Route::Upgrade { doc: Some(doc), .. },
    } = parse_request(data, metrics)
    {
        assert!(head_bytes <= data.len());
        assert!(!doc.is_empty() && doc.len() <= 512);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(Some(doc)) = decode_doc_name(text) {
            assert!(!doc.is_empty() && doc.len() <= 512);
        }
    }
});
