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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
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
    /// Handed out by [`Queue::take_due`] and not reported yet.
    pub in_flight: bool,
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
    /// Its key in `Queue::due`, while something of it is due (and not being attempted).
    due_key: Option<(Instant, u64)>,
    /// What it adds to `Queue::n_pending`.
    n_counted: usize,
}

impl Slot {
    fn is_idle(&self) -> bool {
        self.sealed.is_none() && self.queued.is_empty()
    }

    fn n_pending(&self) -> usize {
        usize::from(self.sealed.is_some()) + self.queued.len()
    }

    /// When something of this slot is due; `None` with nothing pending or while its
    /// delivery is being attempted.
    fn due(&self, debounce: Duration) -> Option<Instant> {
        if let Some(sealed) = &self.sealed {
            return (!sealed.in_flight).then_some(sealed.next_at);
        }
        let front = self.queued.front()?;
        Some(match (&front.kind, self.last_changed) {
            (EventKind::Changed { .. }, Some(last)) => (last + debounce).max(front.queued_at),
            _ => front.queued_at,
        })
    }

    fn state(&self, doc: &str) -> DocState {
        DocState {
            doc: doc.to_owned(),
            sealed: self.sealed.as_ref().map(|d| SealedState {
                id: d.id.clone(),
                event: d.event.to_owned(),
                body: d.body.clone(),
                attempts: d.attempts,
            }),
            queued: self.queued.iter().map(EventState::of).collect(),
        }
    }
}

/// One URL's pending deliveries.
#[derive(Debug)]
pub struct Queue {
    policy: Policy,
    slots: HashMap<Arc<str>, Slot>,
    /// Every slot with something due, by when (and a sequence number, so keys are unique):
    /// the next delivery is the first entry, found without a scan.
    due: BTreeMap<(Instant, u64), Arc<str>>,
    next_seq: u64,
    /// Documents whose persisted state is out of date; drained by [`Queue::take_changes`].
    changed: HashSet<Arc<str>>,
    /// Deliveries and events pending over every slot.
    n_pending: usize,
}

impl Queue {
    /// An empty queue.
    pub fn new(policy: Policy) -> Queue {
        Queue {
            policy,
            slots: HashMap::new(),
            due: BTreeMap::new(),
            next_seq: 0,
            changed: HashSet::new(),
            n_pending: 0,
        }
    }

    /// The pacing rules.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// After any change to `doc`'s slot: its place in `due`, the pending count, and a note
    /// that its persisted state is out of date.
    fn touched(&mut self, doc: &Arc<str>) {
        let debounce = self.policy.debounce;
        let Some(slot) = self.slots.get_mut(doc) else {
            return;
        };
        let due = slot.due(debounce);
        if slot.due_key.map(|(at, _)| at) != due {
            if let Some(key) = slot.due_key.take() {
                self.due.remove(&key);
            }
            if let Some(at) = due {
                let key = (at, self.next_seq);
                self.next_seq += 1;
                self.due.insert(key, doc.clone());
                slot.due_key = Some(key);
            }
        }
        let n = slot.n_pending();
        self.n_pending = self.n_pending + n - slot.n_counted;
        slot.n_counted = n;
        self.changed.insert(doc.clone());
    }

    /// Takes `event` in, coalescing it with what its document has pending.
    pub fn offer(&mut self, event: Event, now: Instant) -> Offered {
        if !self.slots.contains_key(&event.doc) && self.slots.len() >= self.policy.docs_max {
            self.prune(now);
            if self.slots.len() >= self.policy.docs_max {
                return Offered::Dropped;
            }
        }
        let doc = event.doc.clone();
        let slot = self.slots.entry(doc.clone()).or_default();
        let outcome = coalesce(slot, event);
        self.touched(&doc);
        outcome
    }

    /// When the next delivery is due (possibly already), `None` with nothing due.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.keys().next().map(|(at, _)| *at)
    }

    /// The delivery due soonest if it is due at `now`, sealed first if needed (its id from
    /// `new_id`), and marked as being attempted until the caller reports
    /// [`Queue::delivered`] or [`Queue::failed`].
    pub fn take_due(
        &mut self,
        now: Instant,
        new_id: &mut dyn FnMut() -> String,
    ) -> Option<(Arc<str>, Delivery)> {
        let (&(at, _), doc) = self.due.iter().next()?;
        if at > now {
            return None;
        }
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
                in_flight: false,
            });
        }
        let sealed = slot.sealed.as_mut()?;
        sealed.in_flight = true;
        let delivery = sealed.clone();
        self.touched(&doc);
        Some((doc, delivery))
    }

    /// Delivery `id` of `doc` was answered 2xx: it is done.
    pub fn delivered(&mut self, doc: &Arc<str>, id: &str) -> bool {
        let Some(slot) = self.slots.get_mut(doc) else {
            return false;
        };
        if !slot.sealed.as_ref().is_some_and(|d| d.id == id) {
            return false;
        }
        slot.sealed = None;
        self.touched(doc);
        true
    }

    /// Delivery `id` of `doc` failed at `now`; `jitter` in `0.0..1.0` spreads the retry over
    /// the upper half of the backoff delay.
    pub fn failed(&mut self, doc: &Arc<str>, id: &str, now: Instant, jitter: f64) -> Failed {
        let policy = self.policy;
        let Some(slot) = self.slots.get_mut(doc) else {
            return Failed::Unknown;
        };
        let Some(sealed) = slot.sealed.as_mut().filter(|d| d.id == id) else {
            return Failed::Unknown;
        };
        sealed.attempts += 1;
        sealed.in_flight = false;
        let outcome = if sealed.attempts >= policy.attempts_max {
            slot.sealed = None;
            Failed::GaveUp
        } else {
            sealed.next_at = now + backoff(&policy, sealed.attempts, jitter);
            Failed::RetryAt(sealed.next_at)
        };
        self.touched(doc);
        outcome
    }

    /// Delivery `id` of `doc`, handed out by [`Queue::take_due`], was not attempted after all:
    /// due again at once (no attempt counted).
    pub fn unclaim(&mut self, doc: &Arc<str>, id: &str) {
        let Some(sealed) = self
            .slots
            .get_mut(doc)
            .and_then(|slot| slot.sealed.as_mut())
            .filter(|d| d.id == id)
        else {
            return;
        };
        sealed.in_flight = false;
        self.touched(doc);
    }

    /// Forgets documents with nothing pending whose debounce window is over (a scan: call it
    /// now and then, not per event).
    pub fn prune(&mut self, now: Instant) {
        let debounce = self.policy.debounce;
        self.slots.retain(|_, slot| {
            !slot.is_idle() || slot.last_changed.is_some_and(|t| t + debounce > now)
        });
    }

    /// Deliveries and events pending (sealed plus queued).
    pub fn pending(&self) -> usize {
        self.n_pending
    }

    /// The persisted state of every document that changed since the last call (one with
    /// nothing pending has no `sealed` and no `queued`: it is to be forgotten).
    pub fn take_changes(&mut self) -> Vec<DocState> {
        let changed = std::mem::take(&mut self.changed);
        let mut states: Vec<DocState> = changed
            .iter()
            .map(|doc| match self.slots.get(doc) {
                Some(slot) => slot.state(doc),
                None => DocState {
                    doc: doc.to_string(),
                    sealed: None,
                    queued: Vec::new(),
                },
            })
            .collect();
        states.sort_by(|a, b| a.doc.cmp(&b.doc));
        states
    }

    /// The persisted state of every document with something pending, by name.
    pub fn state(&self) -> Vec<DocState> {
        let mut docs: Vec<DocState> = self
            .slots
            .iter()
            .filter(|(_, slot)| !slot.is_idle())
            .map(|(doc, slot)| slot.state(doc))
            .collect();
        docs.sort_by(|a, b| a.doc.cmp(&b.doc));
        docs
    }

    /// Takes in what a previous process persisted: every sealed delivery is due at `now`
    /// (with its id and attempts), queued events behind it as they were. A document without
    /// anything pending is skipped.
    ///
    /// # Errors
    /// A message when an entry does not make sense.
    pub fn restore(&mut self, docs: Vec<DocState>, now: Instant) -> Result<usize, String> {
        for entry in docs {
            let doc: Arc<str> = Arc::from(entry.doc.as_str());
            let sealed = match entry.sealed {
                Some(s) => Some(Delivery {
                    id: s.id,
                    event: EventKind::parse_name(&s.event)
                        .ok_or_else(|| format!("unknown event {:?}", s.event))?,
                    body: s.body,
                    attempts: s.attempts,
                    next_at: now,
                    in_flight: false,
                }),
                None => None,
            };
            let mut queued = VecDeque::new();
            for event in entry.queued {
                queued.push_back(event.into_event(&doc, now)?);
            }
            if sealed.is_none() && queued.is_empty() {
                continue;
            }
            self.slots.insert(
                doc.clone(),
                Slot {
                    sealed,
                    queued,
                    ..Slot::default()
                },
            );
            self.touched(&doc);
        }
        // Just read: nothing to write back.
        self.changed.clear();
        Ok(self.n_pending)
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
                // A deleted epoch never changes again (a new document gets a new epoch): a
                // change of it arriving after its delete is older than the delete.
                (Deleted, Deleted) | (Deleted, Changed { .. }) => return Offered::Coalesced,
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

/// The first line of a URL's state file (`<data-dir>/webhooks/<url hash>.jsonl`); each
/// further line is a [`DocState`], the last line of a document winning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateHeader {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The URL the deliveries go to.
    pub url: String,
}

/// One document's pending deliveries (none: forget the document).
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
        assert!(q.delivered(&Arc::from("d"), &first.id));
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
            let Failed::RetryAt(at) = q.failed(&Arc::from("d"), &d.id, now, 1.0) else {
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
        // Handed out and given back unattempted: due again, no attempt counted.
        let later = now + Duration::from_secs(60);
        assert!(
            q.take_due(later, &mut new_id).is_none(),
            "still being attempted"
        );
        q.unclaim(&Arc::from("d"), &d.id);
        let (_, same) = q.take_due(later, &mut new_id).expect("due again");
        assert_eq!((same.id.as_str(), same.attempts), (d.id.as_str(), 3));
        assert_eq!(q.failed(&Arc::from("d"), &d.id, now, 0.0), Failed::GaveUp);
        assert_eq!(q.failed(&Arc::from("d"), &d.id, now, 0.0), Failed::Unknown);
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
        assert_eq!(
            q.offer(changed("d", "e1", 4, t0), t0),
            Offered::Coalesced,
            "stale"
        );
        assert_eq!(q.offer(changed("d", "e2", 1, t0), t0), Offered::Queued);
        assert_eq!(q.offer(changed("d", "e2", 2, t0), t0), Offered::Coalesced);
        assert_eq!(q.pending(), 3);
        assert!(q.delivered(&Arc::from("d"), &first.id));
        // The delete is not debounced; the change of the new epoch is.
        let (_, del) = q.take_due(t0, &mut new_id).expect("delete due at once");
        assert_eq!(del.event, "deleted");
        let v: serde_json::Value = serde_json::from_str(&del.body).expect("json");
        assert_eq!(v["epoch"], "e1");
        assert!(v.get("head").is_none());
        assert!(q.delivered(&Arc::from("d"), &del.id));
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
    fn changes_and_state_round_trip_and_restore_due_at_once() {
        let t0 = Instant::now();
        let mut q = Queue::new(policy());
        let mut new_id = ids();
        let d1: Arc<str> = Arc::from("d\"1");
        q.offer(changed(&d1, "e", 4, t0), t0);
        let (_, sealed) = q.take_due(t0, &mut new_id).expect("due");
        assert!(
            q.take_due(t0, &mut new_id).is_none(),
            "being attempted: not due again"
        );
        q.failed(&d1, &sealed.id, t0, 0.5);
        q.offer(changed(&d1, "e", 6, t0), t0);
        q.offer(deleted("x", "e9", t0), t0);
        let changes = q.take_changes();
        assert_eq!(
            changes.iter().map(|c| c.doc.as_str()).collect::<Vec<_>>(),
            ["d\"1", "x"]
        );
        assert!(q.take_changes().is_empty(), "drained");
        // A coalesced head is a change too (the persisted event must carry it).
        q.offer(changed(&d1, "e", 7, t0), t0);
        let changes = q.take_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].queued[0].head, Some(7));
        let state = q.state();
        let text = serde_json::to_string(&state).expect("serialize");
        let back: Vec<DocState> = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, state);
        let t1 = t0 + Duration::from_secs(3600);
        let mut restored = Queue::new(policy());
        assert_eq!(restored.restore(back, t1), Ok(3));
        assert_eq!(restored.state(), state);
        assert!(restored.take_changes().is_empty(), "nothing to write back");
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
        assert_eq!(restored.pending(), 0);
        // Forgotten documents are written as empty entries.
        let gone = restored.take_changes();
        assert!(
            gone.iter()
                .all(|g| g.sealed.is_none() && g.queued.is_empty()),
            "{gone:?}"
        );
        let bad = vec![DocState {
            doc: "y".to_owned(),
            sealed: None,
            queued: vec![EventState {
                event: "exploded".to_owned(),
                epoch: "e".to_owned(),
                head: None,
                time_ms: 0,
            }],
        }];
        assert!(Queue::new(policy()).restore(bad, t1).is_err());
    }

    #[test]
    fn the_due_index_orders_many_documents_without_a_scan() {
        let t0 = Instant::now();
        let mut q = Queue::new(Policy {
            docs_max: 10_000,
            ..policy()
        });
        let mut new_id = ids();
        for n in 0..1000u64 {
            let at = t0 + Duration::from_millis(n);
            q.offer(changed(&format!("doc{n}"), "e", 1, at), at);
        }
        assert_eq!(q.pending(), 1000);
        assert_eq!(q.next_due(), Some(t0));
        let mut order = Vec::new();
        while let Some((doc, d)) = q.take_due(t0 + Duration::from_secs(2), &mut new_id) {
            order.push(doc.to_string());
            assert!(q.delivered(&doc, &d.id));
        }
        let expected: Vec<String> = (0..1000).map(|n| format!("doc{n}")).collect();
        assert_eq!(order, expected, "oldest first");
        assert_eq!(q.pending(), 0);
        assert_eq!(q.next_due(), None);
    }
}
