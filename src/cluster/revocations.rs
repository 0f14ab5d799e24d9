//! Revocations across the cluster: every node's `POST /admin/revoke` reaches the connections
//! of every node. The directory thread publishes the rules of its node's list that the
//! database does not have yet (`collab_revocations`) and, every [`POLL_INTERVAL`], puts in
//! force the rules other nodes published ([`crate::auth::Auth::adopt`], saved like a local
//! one) and sends them to its shards ([`crate::acceptor::ShardMsg::Revoke`]), which close the
//! connections they match with 1008 `revoked`. A rule travels as its JSON (`jti`, or `sub`,
//! `doc` and the revocation second `at`), so every node applies the same rule.

use std::time::Duration;

use crate::auth::{RevokeRequest, Rule};

/// How often a node looks for revocations published by the others: a revocation reaches
/// every node's connections within this plus one statement.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The published form of `rule`.
pub(crate) fn to_json(rule: &Rule) -> String {
    match rule {
        Rule::Jti(jti) => serde_json::json!({ "jti": jti }).to_string(),
        Rule::Sub { sub, scope, at } => {
            let doc = match scope {
                crate::auth::DocScope::All => None,
                crate::auth::DocScope::Exact(name) => Some(name.clone()),
                crate::auth::DocScope::Prefix(prefix) => Some(format!("{prefix}*")),
            };
            serde_json::json!({ "sub": sub, "doc": doc, "at": at }).to_string()
        }
    }
}

/// The rule published as `text`; `None` when it does not parse (logged by the caller).
pub(crate) fn from_json(text: &str) -> Option<Rule> {
    #[derive(serde::Deserialize)]
    struct Published {
        jti: Option<String>,
        sub: Option<String>,
        doc: Option<String>,
        #[serde(default)]
        at: u64,
    }
    let published: Published = serde_json::from_str(text).ok()?;
    let request = RevokeRequest {
        jti: published.jti,
        sub: published.sub,
        doc: published.doc,
    };
    Rule::from_request(&request, published.at).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_round_trip() {
        for (jti, sub, doc, at) in [
            (Some("t1"), None, None, 0),
            (None, Some("ann"), None, 17),
            (None, Some("ann"), Some("notes/*"), 18),
            (None, Some("bob"), Some("exact"), 19),
        ] {
            let request = RevokeRequest {
                jti: jti.map(str::to_owned),
                sub: sub.map(str::to_owned),
                doc: doc.map(str::to_owned),
            };
            let rule = Rule::from_request(&request, at).expect("valid");
            assert_eq!(from_json(&to_json(&rule)), Some(rule));
        }
        assert_eq!(from_json("{\"jti\":\"\"}"), None);
        assert_eq!(from_json("not json"), None);
    }
}
