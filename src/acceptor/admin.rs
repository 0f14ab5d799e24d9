//! The admin worker: carries out `POST /admin/revoke` off the acceptor thread, so that the
//! acceptor never blocks on a file or on the shards.
//!
//! The acceptor authenticates the request, reads its body and sends an [`AdminJob`]; the
//! worker makes the revocation durable ([`Auth::revoke`]: write, fsync, rename), asks every
//! shard to close the connections it matches, waits for their counts at most
//! [`REVOKE_REPLY_WAIT`], and hands the complete HTTP answer back ([`AdminDone`]) through a
//! channel and the acceptor's waker. The worker owns no socket.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{info, warn};

use crate::auth::{now_unix, Auth, RevokeRequest};

use super::handoff::{ShardInbox, ShardMsg};
use super::http::response;

/// How long a revocation waits for the shards' counts before answering with what it has
/// (a shard answers within one loop turn; only a stuck or dead one takes this long).
pub const REVOKE_REPLY_WAIT: Duration = Duration::from_secs(1);

/// Which pending connection asked: its slab key and the serial it was accepted with (a key
/// is reused; the serial is not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobId {
    /// The pending connection's slab key.
    pub key: usize,
    /// Its accept serial.
    pub serial: u64,
}

/// A revocation to carry out.
#[derive(Debug)]
pub struct AdminJob {
    /// Who asked.
    pub id: JobId,
    /// The checked JSON body.
    pub request: RevokeRequest,
}

/// The answer to an [`AdminJob`].
#[derive(Debug)]
pub struct AdminDone {
    /// Who asked.
    pub id: JobId,
    /// The complete HTTP response.
    pub answer: Vec<u8>,
}

/// The JSON answer `{"error":"..."}` with `status`.
pub fn json_error(status: u16, message: &str, extra_headers: &[&str]) -> Vec<u8> {
    let body = serde_json::json!({ "error": message }).to_string();
    response(status, "application/json", body.as_bytes(), extra_headers)
}

/// Starts the worker. It ends when the acceptor drops the job sender.
///
/// # Errors
/// When the thread cannot be spawned.
pub fn spawn_admin_worker(
    auth: Arc<Auth>,
    shards: Vec<ShardInbox>,
    acceptor_waker: Arc<mio::Waker>,
) -> std::io::Result<(Sender<AdminJob>, Receiver<AdminDone>, JoinHandle<()>)> {
    let (job_tx, job_rx) = crossbeam_channel::unbounded::<AdminJob>();
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<AdminDone>();
    let thread = std::thread::Builder::new()
        .name("admin".to_owned())
        .spawn(move || {
            for job in job_rx {
                let answer = revoke(&auth, &shards, &job.request);
                if done_tx.send(AdminDone { id: job.id, answer }).is_err() {
                    return;
                }
                let _ = acceptor_waker.wake();
            }
        })?;
    Ok((job_tx, done_rx, thread))
}

fn revoke(auth: &Auth, shards: &[ShardInbox], request: &RevokeRequest) -> Vec<u8> {
    let rule = match auth.revoke(request, now_unix()) {
        Ok(rule) => Arc::new(rule),
        Err(Ok(why)) => return json_error(400, why, &[]),
        Err(Err(e)) => {
            warn!("admin: revocation not saved: {e}");
            return json_error(503, &format!("revocation not saved: {e}"), &[]);
        }
    };
    let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
    let mut n_asked = 0;
    for shard in shards.iter().filter(|s| s.is_alive()) {
        let msg = ShardMsg::Revoke {
            rule: rule.clone(),
            reply: reply_tx.clone(),
        };
        if shard.send(msg).is_ok() {
            n_asked += 1;
        }
    }
    drop(reply_tx);
    let deadline = Instant::now() + REVOKE_REPLY_WAIT;
    let (mut n_closed, mut n_answered) = (0usize, 0usize);
    while n_answered < n_asked {
        match reply_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(n) => {
                n_closed += n;
                n_answered += 1;
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    info!(
        "admin: revoked {rule:?}; closed {n_closed} connections ({n_answered} of {n_asked} shards answered)"
    );
    let body = if n_answered == n_asked {
        format!("{{\"closed\":{n_closed}}}")
    } else {
        format!(
            "{{\"closed\":{n_closed},\"shards_unanswered\":{}}}",
            n_asked - n_answered
        )
    };
    response(200, "application/json", body.as_bytes(), &[])
}
