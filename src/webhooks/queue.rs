//! One URL's pending deliveries: coalescing, debounce, retries with backoff. Pure: no socket,
//! file or clock (every call takes `now`), so the rules are unit-tested here and the worker
//! (`worker.rs`) only performs what the queue decides.
//!
//! Per document the queue holds at most one sealed delivery (body and id fixed, being
//! attempted or waiting for its retry) and a few queued events behind it, coalesced: a
//! `changed` replaces a `changed` of the same epoch before it (the latest head wins), a
//! `deleted` replaces them. A `changed` is sealed no sooner than `--webhook-debounce` after
//! the previous one of its document was, so a receiver gets at most one per window per
//! document (the first change after a quiet window goes out at once). The queue is bounded
//! by documents: at most `--webhook-pending-max` of them; an event for one more is dropped
//! (and counted).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Event, EventKind};

/// Events queued behind a document's sealed delivery at most (after coalescing only a
/// delete-and-recreate cycle adds one); past it the oldest is dropped.
pub const QUEUED_PER_DOC_MAX: usize = 8;

/// Version of the persisted state's format.
pub const STATE_VERSION: u32 = 1;

/// How deliveries are paced and retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Least time between two `changed` deliveries of one document.
    pub debounce: Duration,
    /// Delay before the first retry; doubled after each failure.
    pub retry_initial: Duration,
    /// Longest delay between two attempts.
    pub retry_max: Duration,
    /// Attempts of one delivery at most (the first included); then it is dropped.
    pub attempts_max: u32,
    /// Documents with something pending at most.
    pub docs_max: usize,
}

/// A delivery whose body and id are fixed: every attempt sends exactly this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// `X-Collab-Delivery`: the same on every attempt.
    pub id: String,
    /// `changed` or `deleted`.
    pub event: &'static str,
    /// The JSON body, as signed.
    pub body: String,
    /// Attempts that failed so far.
    pub attempts: u32,
    /// When the next attempt is due.
    pub next_at: Instant,
}

/// What became of an offered event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    /// Queued as a new entry.
    Queued,
    /// Merged into an entry already pending (or already covered by it).
    Coalesced,
    /// Dropped: `n` events (the oldest queued one of a full document, or this one when the
    /// queue is at `docs_max`).
    Dropped,
}

/// What became of a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failed {
    /// Tried again at this time.
    RetryAt(Instant),
    /// The attempts are used up: the delivery is dropped.
    GaveUp,
    /// Not (or no longer) the document's sealed delivery.
    Unknown,
}

#[derive(Debug, Default)]
struct Slot {
    sealed: Option<Delivery>,
    queued: VecDeque<Event>,
    /// When the document's last `changed` was sealed (debounce); not persisted.
    last_changed: Option<Instant>,
}

impl Slot {
    fn is_idle(&self) -> bool {
        self.sealed.is_none() && self.queued.is_empty()
    }

    /// When something of this slot is due, if anything is pending.
    fn due(&self, debounce: Duration) -> Option<Instant> {
        if let Some(sealed) = &self.sealed {
            return Some(sealed.next_at);
        }
        let front = self.queued.front()?;
        Some(match (&front.kind, self.last_changed) {
            (EventKind::Changed { .. }, Some(last)) => last + debounce,
            // Due at once: the earliest instant there is.
            _ => front.queued_at,
        })
    }
}

/// One URL's pending deliveries.
#[derive(Debug)]
pub struct Queue {
    policy: Policy,
    slots: HashMap<Arc<str>, Slot>,
    /// Something changed since the last [`Queue::take_dirty`]: the state must be persisted.
    dirty: bool,
}

impl Queue {
    /// An empty queue.
    pub fn new(policy: Policy) -> Queue {
        Queue {
            policy,
            slots: HashMap::new(),
            dirty: false,
        }
    }

    /// The pacing rules.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Takes `event` in, coalescing it with what its document has pending.
    pub fn offer(&mut self, event: Event, now: Instant) -> Offered {
        if !self.slots.contains_key(&event.doc) && self.slots.len() >= self.policy.docs_max {
            self.prune(now);
            if self.slots.len() >= self.policy.docs_max {
                return Offered::Dropped;
            }
        }
        let slot = self.slots.entry(event.doc.clone()).or_default();
        let outcome = coalesce(slot, event);
        if outcome != Offered::Coalesced {
            self.dirty = true;
        }
        outcome
    }

    /// When the next delivery is due (possibly already), `None` with nothing pending.
    pub fn next_due(&self) -> Option<Instant> {
        let debounce = self.policy.debounce;
        self.slots.values().filter_map(|s| s.due(debounce)).min()
    }

    /// The delivery due soonest if it is due at `now`, sealed first if needed (its id from
    /// `new_id`); the caller attempts it and reports [`Queue::delivered`] or [`Queue::failed`].
    pub fn take_due(
        &mut self,
        now: Instant,
        new_id: &mut dyn FnMut() -> String,
    ) -> Option<(Arc<str>, Delivery)> {
        let debounce = self.policy.debounce;
        let (doc, _) = self
            .slots
            .iter()
            .filter_map(|(doc, slot)| Some((doc, slot.due(debounce)?)))
            .filter(|(_, due)| *due <= now)
            .min_by_key(|(_, due)| *due)?;
        let doc = doc.clone();
        let slot = self.slots.get_mut(&doc)?;
        if slot.sealed.is_none() {
            let event = slot.queued.pop_front()?;
            if matches!(event.kind, EventKind::Changed { .. }) {
                slot.last_changed = Some(now);
            }
            slot.sealed = Some(Delivery {
                id: new_id(),
                event: event.kind.name(),
                body: event.body(),
                attempts: 0,
                next_at: now,
            });
            self.dirty = true;
        }
        let delivery = slot.sealed.clone()?;
        Some((doc, delivery))
    }

    /// Delivery `id` of `doc` was answered 2xx: it is done.
    pub fn delivered(&mut self, doc: &str, id: &str) -> bool {
        let Some(slot) = self.slots.get_mut(doc) else {
            return false;
        };
        if slot.sealed.as_ref().is_some_and(|d| d.id == id) {
            slot.sealed = None;
            self.dirty = true;
            return true;
        }
        false
    }

    /// Delivery `id` of `doc` failed at `now`; `jitter` in `0.0..1.0` spreads the retry over
    /// the upper half of the backoff delay.
    pub fn failed(&mut self, doc: &str, id: &str, now: Instant, jitter: f64) -> Failed {
        let policy = self.policy;
        let Some(slot) = self.slots.get_mut(doc) else {
            return Failed::Unknown;
        };
        let Some(sealed) = slot.sealed.as_mut().filter(|d| d.id == id) else {
            return Failed::Unknown;
        };
        sealed.attempts += 1;
        self.dirty = true;
        if sealed.attempts >= policy.attempts_max {
            slot.sealed = None;
            return Failed::GaveUp;
        }
        let delay = backoff(&policy, sealed.attempts, jitter);
        sealed.next_at = now + delay;
        Failed::RetryAt(sealed.next_at)
    }

    /// Forgets documents with nothing pending whose debounce window is over.
    pub fn prune(&mut self, now: Instant) {
        let debounce = self.policy.debounce;
        self.slots.retain(|_, slot| {
            !slot.is_idle() || slot.last_changed.is_some_and(|t| t + debounce > now)
        });
    }

    /// Deliveries and events pending (sealed plus queued).
    pub fn pending(&self) -> usize {
        self.slots
            .values()
            .map(|s| usize::from(s.sealed.is_some()) + s.queued.len())
            .sum()
    }

    /// Whether the state changed since the last call (and clears the flag).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Marks the state as changed (a write of it failed and must be tried again).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Everything pending, to persist.
    pub fn state(&self, url: &str) -> QueueState {
        let mut docs: Vec<DocState> = self
            .slots
            .iter()
            .filter(|(_, slot)| !slot.is_idle())
            .map(|(doc, slot)| DocState {
                doc: doc.to_string(),
                sealed: slot.sealed.as_ref().map(|d| SealedState {
                    id: d.id.clone(),
                    event: d.event.to_owned(),
                    body: d.body.clone(),
                    attempts: d.attempts,
                }),
                queued: slot.queued.iter().map(EventState::of).collect(),
            })
            .collect();
        docs.sort_by(|a, b| a.doc.cmp(&b.doc));
        QueueState {
            version: STATE_VERSION,
            url: url.to_owned(),
            docs,
        }
    }

    /// Takes in what a previous process persisted: every sealed delivery is due at `now`
    /// (with its id and attempts), queued events behind it as they were.
    ///
    /// # Errors
    /// A message when the state is of another version or an entry does not make sense.
    pub fn restore(&mut self, state: QueueState, now: Instant) -> Result<usize, String> {
        if state.version != STATE_VERSION {
            return Err(format!(
                "state version {} (this server reads {STATE_VERSION})",
                state.version
            ));
        }
        let mut n = 0;
        for entry in state.docs {
            let doc: Arc<str> = Arc::from(entry.doc.as_str());
            let sealed = match entry.sealed {
                Some(s) => Some(Delivery {
                    id: s.id,
                    event: EventKind::parse_name(&s.event)
                        .ok_or_else(|| format!("unknown event {:?}", s.event))?,
                    body: s.body,
                    attempts: s.attempts,
                    next_at: now,
                }),
                None => None,
            };
            let mut queued = VecDeque::new();
            for event in entry.queued {
                queued.push_back(event.into_event(&doc, now)?);
            }
            n += usize::from(sealed.is_some()) + queued.len();
            self.slots.insert(
                doc,
                Slot {
                    sealed,
                    queued,
                    last_changed: None,
                },
            );
        }
        Ok(n)
    }
}

/// The delay before attempt `attempts + 1`: `retry_initial * 2^(attempts-1)`, at most
/// `retry_max`, of which the upper half is spread by `jitter`.
pub fn backoff(policy: &Policy, attempts: u32, jitter: f64) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(30);
    let full = policy
        .retry_initial
        .saturating_mul(factor)
        .min(policy.retry_max);
    let half = full / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

fn coalesce(slot: &mut Slot, event: Event) -> Offered {
    use EventKind::{Changed, Deleted};
    // Already covered by what is sealed (a repeated or older head of the same epoch).
    if slot.queued.is_empty() {
        if let (Some(sealed), Changed { head }) = (&slot.sealed, &event.kind) {
            if sealed.event == "changed" && covers(&sealed.body, &event.epoch, *head) {
                return Offered::Coalesced;
            }
        }
    }
    if let Some(back) = slot.queued.back_mut() {
        if back.epoch == event.epoch {
            match (&back.kind, &event.kind) {
                (Changed { head: old }, Changed { head: new }) => {
                    if new >= old {
                        back.kind = event.kind;
                        back.time_ms = event.time_ms;
                    }
                    return Offered::Coalesced;
                }
                (Changed { .. }, Deleted) => {
                    back.kind = Deleted;
                    back.time_ms = event.time_ms;
                    return Offered::Coalesced;
                }
                (Deleted, Deleted) => return Offered::Coalesced,
                // A change after a delete with the same epoch would be a bug upstream; keep it.
                (Deleted, Changed { .. }) => {}
            }
        }
    }
    slot.queued.push_back(event);
    if slot.queued.len() > QUEUED_PER_DOC_MAX {
        slot.queued.pop_front();
        return Offered::Dropped;
    }
    Offered::Queued
}

/// Whether a sealed `changed` body already names `epoch` at `head` or later.
fn covers(body: &str, epoch: &str, head: u64) -> bool {
    #[derive(Deserialize)]
    struct Fields {
        epoch: String,
        head: u64,
    }
    serde_json::from_str::<Fields>(body).is_ok_and(|f| f.epoch == epoch && f.head >= head)
}

/// One URL's pending state as persisted (`<data-dir>/webhooks/<url hash>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The URL the deliveries go to.
    pub url: String,
    /// Documents with something pending, by name.
    pub docs: Vec<DocState>,
}

/// One document's pending deliveries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocState {
    /// The document.
    pub doc: String,
    /// The delivery being attempted.
    pub sealed: Option<SealedState>,
    /// Events behind it, oldest first.
    pub queued: Vec<EventState>,
}

/// A sealed delivery as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedState {
    /// Its delivery id.
    pub id: String,
    /// `changed` or `deleted`.
    pub event: String,
    /// The exact body.
    pub body: String,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// A queued event as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventState {
    /// `changed` or `deleted`.
    pub event: String,
    /// The document's epoch.
    pub epoch: String,
    /// The head, for `changed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<u64>,
    /// When it happened, in milliseconds since the Unix epoch.
    pub time_ms: u64,
}

impl EventState {
    fn of(event: &Event) -> EventState {
        EventState {
            event: event.kind.name().to_owned(),
            epoch: event.epoch.to_string(),
            head: match event.kind {
                EventKind::Changed { head } => Some(head),
                EventKind::Deleted => None,
            },
            time_ms: event.time_ms,
        }
    }

    fn into_event(self, doc: &Arc<str>, now: Instant) -> Result<Event, String> {
        let kind = match (self.event.as_str(), self.head) {
            ("changed", Some(head)) => EventKind::Changed { head },
            ("deleted", None) => EventKind::Deleted,
            _ => return Err(format!("bad queued event {:?}", self.event)),
        };
        Ok(Event {
            doc: doc.clone(),
            epoch: Arc::from(self.epoch.as_str()),
            kind,
            time_ms: self.time_ms,
            queued_at: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            debounce: Duration::from_secs(1),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            attempts_max: 4,
            docs_max: 3,
        }
    }

    fn changed(doc: &str, epoch: &str, head: u64, at: Instant) -> Event {
        Event {
            doc: Arc::from(doc),
            epoch: Arc::from(epoch),
            kind: EventKind::Changed { head },
            time_ms: 1_000 + head,
            queued_at: at,
        }
    }

    fn deleted(doc: &str, epoch: &str, at: Instant) -> Event {
        Event {
            doc: Arc::from(doc),
            epoch: Arc::from(epoch),
            kind: EventKind::Deleted,
            time_ms: 5_000,
            queued_at: at,
        }
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("id{n}")
        }
    }

    fn head_of(body: &str) -> Option<u64> {
        serde_json::from_str::<serde_json::Value>(body).ok()?["head"].as_u64()
    }

    #[test]
    fn a_burst_is_one_delivery_per_window_with_the_latest_head() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy());
        let mut new_id = ids();
        assert_eq!(q.offer(changed("d", "e", 1, t0), t0), Offered::Queued);
        // The first change after a quiet window goes out at once.
        let (doc, first) = q.take_due(t0, &mut new_id).expect("due");
        assert_eq!((&*doc, head_of(&first.body)), ("d", Some(1)));
        assert!(q.delivered("d", &first.id));
        for head in 2..=50 {
            let at = t0 + Duration::from_millis(head * 10);
            assert_ne!(q.offer(changed("d", "e", head, at), at), Offered::Dropped);
        }
        assert_eq!(q.pending(), 1, "coalesced to one");
        let t1 = t0 + Duration::from_millis(600);
        assert!(q.take_due(t1, &mut new_id).is_none(), "inside the window");
        assert_eq!(q.next_due(), Some(t0 + Duration::from_secs(1)));
        let t2 = t0 + Duration::from_secs(1);
        let (_, second) = q.take_due(t2, &mut new_id).expect("window over");
        assert_eq!(head_of(&second.body), Some(50));
        assert_ne!(second.id, first.id);
    }

    #[test]
    fn retries_keep_the_id_back_off_and_give_up() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy());
        let mut new_id = ids();
        q.offer(changed("d", "e", 7, t0), t0);
        let (_, d) = q.take_due(t0, &mut new_id).expect("due");
        let mut now = t0;
        let mut delays = Vec::new();
        for attempt in 1..4 {
            let Failed::RetryAt(at) = q.failed("d", &d.id, now, 1.0) else {
                panic!("attempt {attempt} retried");
            };
            delays.push(at - now);
            assert!(
                q.take_due(now, &mut new_id).is_none(),
                "not before its time"
            );
            now = at;
            let (_, again) = q.take_due(now, &mut new_id).expect("retry due");
            assert_eq!(
                (again.id.as_str(), again.body.as_str()),
                (d.id.as_str(), d.body.as_str())
            );
            assert_eq!(again.attempts, attempt);
        }
        assert_eq!(
            delays,
            [100, 200, 400].map(Duration::from_millis),
            "doubling, full jitter at 1.0"
        );
        // A newer change waits behind the retrying delivery.
        q.offer(changed("d", "e", 9, now), now);
        assert_eq!(q.pending(), 2);
        assert_eq!(q.failed("d", &d.id, now, 0.0), Failed::GaveUp);
        assert_eq!(q.failed("d", &d.id, now, 0.0), Failed::Unknown);
        let later = now + Duration::from_secs(1);
        let (_, next) = q.take_due(later, &mut new_id).expect("the newer one");
        assert_eq!(head_of(&next.body), Some(9));
        assert_ne!(next.id, d.id);
    }

    #[test]
    fn backoff_is_capped_and_jittered_in_its_upper_half() {
        let p = policy();
        assert_eq!(backoff(&p, 1, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(&p, 1, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(&p, 2, 0.5), Duration::from_millis(150));
        assert_eq!(backoff(&p, 40, 1.0), Duration::from_secs(10));
        assert_eq!(backoff(&p, 40, 0.0), Duration::from_secs(5));
    }

    #[test]
    fn deletes_replace_changes_and_new_epochs_queue_behind() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy());
        let mut new_id = ids();
        q.offer(changed("d", "e1", 1, t0), t0);
        let (_, first) = q.take_due(t0, &mut new_id).expect("due");
        assert_eq!(q.offer(changed("d", "e1", 3, t0), t0), Offered::Queued);
        assert_eq!(q.offer(deleted("d", "e1", t0), t0), Offered::Coalesced);
        assert_eq!(q.offer(changed("d", "e2", 1, t0), t0), Offered::Queued);
        assert_eq!(q.offer(changed("d", "e2", 2, t0), t0), Offered::Coalesced);
        assert_eq!(q.pending(), 3);
        assert!(q.delivered("d", &first.id));
        // The delete is not debounced; the change of the new epoch is.
        let (_, del) = q.take_due(t0, &mut new_id).expect("delete due at once");
        assert_eq!(del.event, "deleted");
        let v: serde_json::Value = serde_json::from_str(&del.body).expect("json");
        assert_eq!(v["epoch"], "e1");
        assert!(v.get("head").is_none());
        assert!(q.delivered("d", &del.id));
        assert!(q.take_due(t0, &mut new_id).is_none());
        let (_, again) = q
            .take_due(t0 + Duration::from_secs(1), &mut new_id)
            .expect("due after the window");
        let v: serde_json::Value = serde_json::from_str(&again.body).expect("json");
        assert_eq!(
            (v["epoch"].as_str(), v["head"].as_u64()),
            (Some("e2"), Some(2))
        );
    }

    #[test]
    fn the_queue_is_bounded_by_documents() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy());
        for doc in ["a", "b", "c"] {
            assert_eq!(q.offer(changed(doc, "e", 1, t0), t0), Offered::Queued);
        }
        assert_eq!(q.offer(changed("d", "e", 1, t0), t0), Offered::Dropped);
        assert_eq!(q.offer(changed("a", "e", 2, t0), t0), Offered::Coalesced);
        // One document's queue is bounded too (delete/recreate cycles).
        let mut dropped = 0;
        for n in 0..20 {
            let epoch = format!("e{n}");
            if q.offer(changed("b", &epoch, 1, t0), t0) == Offered::Dropped {
                dropped += 1;
            }
        }
        assert_eq!(dropped, 20 - (QUEUED_PER_DOC_MAX - 1));
        assert_eq!(q.pending(), 2 + QUEUED_PER_DOC_MAX);
    }

    #[test]
    fn state_round_trips_and_restores_due_at_once() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy());
        let mut new_id = ids();
        q.offer(changed("d\"1", "e", 4, t0), t0);
        let (_, sealed) = q.take_due(t0, &mut new_id).expect("due");
        q.failed("d\"1", &sealed.id, t0, 0.5);
        q.offer(changed("d\"1", "e", 6, t0), t0);
        q.offer(deleted("x", "e9", t0), t0);
        assert!(q.take_dirty());
        assert!(!q.take_dirty());
        let state = q.state("http://h/");
        let text = serde_json::to_string(&state).expect("serialize");
        let back: QueueState = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, state);
        let t1 = t0 + Duration::from_secs(3600);
        let mut restored = Queue::new(policy());
        assert_eq!(restored.restore(back, t1), Ok(3));
        assert_eq!(restored.state("http://h/"), state);
        let mut seen = Vec::new();
        while let Some((doc, delivery)) = restored.take_due(t1, &mut new_id) {
            assert!(restored.delivered(&doc, &delivery.id));
            seen.push((doc.to_string(), delivery));
        }
        let ours = &seen
            .iter()
            .find(|(doc, _)| doc == "d\"1")
            .expect("restored")
            .1;
        assert_eq!((ours.id.as_str(), ours.attempts), (sealed.id.as_str(), 1));
        assert!(seen
            .iter()
            .any(|(doc, d)| doc == "x" && d.event == "deleted"));
        let mut bad = state.clone();
        bad.version = 99;
        assert!(Queue::new(policy()).restore(bad, t1).is_err());
    }
}
