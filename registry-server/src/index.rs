//! The in-memory worker index that serves List.
//!
//! A scheduler pages through thousands of workers many times a minute.
//! Reading them from the database and converting each capabilities
//! document to a protobuf `Struct` on every call costs milliseconds per
//! page. This process therefore keeps every row in memory, with the
//! fields List filters on and the worker already encoded as protobuf.
//!
//! The index follows the database from two sides:
//!
//! - Writes of this process (Register, Deregister, heartbeat flushes and
//!   expiry sweeps) update it as soon as the database confirms them.
//! - A refresh loop reads the rows whose `updated` changed since its last
//!   look, which brings in the writes of other replicas, and counts the
//!   rows to notice deletions. Every [`FULL_RELOAD_EVERY`] it reads the
//!   whole table instead, to catch edits made by hand.
//!
//! A row read from the database replaces an entry unless this process
//! changed the entry after the read started, so a slow read never rolls
//! back a newer local write. Until the first load completes, List reads
//! from the database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use serde_json::Value as Json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use worker_registry::domain::{Role, Status};
use worker_registry::proto::{self, EncodedWorker};
use worker_registry::validation::ListFilter;

use crate::clock::Clock;
use crate::service::{proto_timestamp, string_labels, worker_to_proto};
use crate::store::{HeartbeatWrite, IndexRow, RowChange, RowSelection, Store, StoreResult, WorkerRecord};

/// Time between two reads of the whole table.
pub const FULL_RELOAD_EVERY: Duration = Duration::from_secs(300);

/// Rows per page of a full load.
const LOAD_PAGE: i64 = 2000;

/// How far back each refresh reads before the start of the previous one.
/// Rows carry the writer's clock. A flushed heartbeat carries its arrival
/// time, which is up to one flush interval before the write. The margin
/// covers both, with room for clock differences between replicas.
const CLOCK_MARGIN: Duration = Duration::from_secs(1);

/// Refresh intervals after which List stops trusting an index whose
/// refreshes fail.
const STALE_AFTER_INTERVALS: u32 = 10;

/// Staleness limit until [`WorkerIndex::run`] sets one from the interval.
const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(10);

/// The part of a worker that only a registration changes.
#[derive(Debug)]
struct Fixed {
    name: String,
    role: Role,
    /// Names in the `runtimes` array of the capabilities document.
    runtimes: Vec<String>,
    /// String-valued pairs of the `labels` object of the capabilities document.
    labels: BTreeMap<String, String>,
    token_hash: Option<Vec<u8>>,
    /// The worker without the fields in [`Changes`].
    encoded: EncodedWorker,
}

/// One worker as the index keeps it.
#[derive(Debug)]
struct Entry {
    fixed: Arc<Fixed>,
    changes: Changes,
    /// `changes`, encoded as the worker fields they are.
    encoded_changes: EncodedWorker,
    /// When this process last wrote the entry.
    changed_at: Instant,
}

impl Entry {
    fn new(row: IndexRow, changed_at: Instant) -> Entry {
        let mut worker = worker_to_proto(&row.record);
        Entry::with_worker(row, &mut worker, changed_at)
    }

    /// Builds an entry from a row and the same row converted to protobuf,
    /// when the caller has converted it already. `worker` is left as it was.
    fn with_worker(row: IndexRow, worker: &mut proto::Worker, changed_at: Instant) -> Entry {
        let record = row.record;

        // Encode the worker without its changing fields, then put them back.
        let status = std::mem::take(&mut worker.status);
        let last_heartbeat = worker.last_heartbeat.take();
        let updated = worker.updated.take();
        let lease_expires = worker.lease_expires.take();
        let encoded = EncodedWorker::new(worker);
        worker.status = status;
        worker.last_heartbeat = last_heartbeat;
        worker.updated = updated;
        worker.lease_expires = lease_expires;

        let runtimes = record
            .capabilities
            .get("runtimes")
            .and_then(Json::as_array)
            .map(|names| names.iter().filter_map(Json::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        let labels = string_labels(&record.capabilities).collect();

        let fixed = Fixed {
            name: record.name,
            role: record.role,
            runtimes,
            labels,
            token_hash: row.token_hash,
            encoded,
        };
        let changes = Changes {
            status: record.status,
            last_heartbeat: record.last_heartbeat,
            lease_expires: record.lease_expires,
            updated: record.updated,
        };
        Entry {
            fixed: Arc::new(fixed),
            changes,
            encoded_changes: changes.encode(),
            changed_at,
        }
    }

    /// Returns a copy with new changing fields and their encoding.
    fn with_changes(&self, changes: Changes, changed_at: Instant) -> Entry {
        Entry {
            fixed: Arc::clone(&self.fixed),
            changes,
            encoded_changes: changes.encode(),
            changed_at,
        }
    }

    /// Returns the whole worker, encoded.
    fn encoded(&self) -> EncodedWorker {
        EncodedWorker::join(&self.fixed.encoded, &self.encoded_changes)
    }

    fn matches(&self, filter: &ListFilter, cutoff: &Cutoff) -> bool {
        let fixed = &self.fixed;
        if filter.role.is_some_and(|role| role != fixed.role) {
            return false;
        }
        if !filter.statuses.is_empty() && !filter.statuses.contains(&self.changes.status) {
            return false;
        }
        if !filter.runtimes.iter().all(|name| fixed.runtimes.contains(name)) {
            return false;
        }
        if !filter
            .labels
            .iter()
            .all(|(key, value)| fixed.labels.get(key) == Some(value))
        {
            return false;
        }
        let last_heartbeat = self.changes.last_heartbeat;
        let fresh = match cutoff {
            Cutoff::None => true,
            Cutoff::AnyHeartbeat => last_heartbeat.is_some(),
            Cutoff::At(cutoff) => last_heartbeat.is_some_and(|last| last >= *cutoff),
        };
        fresh && fixed.name.starts_with(&filter.name_prefix)
    }
}

/// The fields of an entry that change without a new registration.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Changes {
    status: Status,
    last_heartbeat: Option<DateTime<Utc>>,
    lease_expires: Option<DateTime<Utc>>,
    updated: DateTime<Utc>,
}

impl Changes {
    /// Encodes these fields as a worker with no other field set.
    fn encode(&self) -> EncodedWorker {
        let changing = proto::Worker {
            status: self.status.to_proto() as i32,
            last_heartbeat: self.last_heartbeat.map(proto_timestamp),
            updated: Some(proto_timestamp(self.updated)),
            lease_expires: self.lease_expires.map(proto_timestamp),
            ..proto::Worker::default()
        };
        EncodedWorker::new(&changing)
    }
}

/// The heartbeat age filter, resolved against the current time.
enum Cutoff {
    /// No age filter.
    None,
    /// The age reaches before any storable time: any heartbeat will do.
    AnyHeartbeat,
    /// The last heartbeat must be at or after this time.
    At(DateTime<Utc>),
}

impl Cutoff {
    fn new(max_age: Option<Duration>, now: DateTime<Utc>) -> Cutoff {
        let Some(age) = max_age else {
            return Cutoff::None;
        };
        // Stored times are whole milliseconds, as in the database queries.
        let cutoff = TimeDelta::from_std(age)
            .ok()
            .and_then(|age| now.trunc_subsecs(3).checked_sub_signed(age))
            .filter(|cutoff| cutoff.timestamp() >= 0);
        match cutoff {
            Some(cutoff) => Cutoff::At(cutoff),
            None => Cutoff::AnyHeartbeat,
        }
    }
}

/// One page of a List call.
#[derive(Debug, Default)]
pub struct Page {
    /// Matching workers, encoded, in id order.
    pub workers: Vec<EncodedWorker>,
    /// Id of the last worker in the page when more matching workers follow.
    pub more_after: Option<i64>,
}

/// The worker index; see the module documentation.
pub struct WorkerIndex {
    entries: RwLock<BTreeMap<i64, Arc<Entry>>>,
    loaded: AtomicBool,
    /// When the last load or refresh that succeeded started.
    last_success: Mutex<Option<Instant>>,
    /// Age of `last_success` after which List no longer trusts the index.
    stale_after: Mutex<Duration>,
}

impl Default for WorkerIndex {
    fn default() -> Self {
        WorkerIndex::new()
    }
}

impl std::fmt::Debug for WorkerIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerIndex")
            .field("workers", &self.len())
            .field("current", &self.is_current())
            .finish()
    }
}

impl WorkerIndex {
    /// Creates an empty index that is not loaded yet.
    pub fn new() -> Self {
        WorkerIndex {
            entries: RwLock::new(BTreeMap::new()),
            loaded: AtomicBool::new(false),
            last_success: Mutex::new(None),
            stale_after: Mutex::new(DEFAULT_STALE_AFTER),
        }
    }

    /// Tells whether the index is loaded and refreshed recently enough to
    /// serve List. When refreshes keep failing, List goes to the database,
    /// which either returns current rows or fails with the real error.
    pub fn is_current(&self) -> bool {
        if !self.loaded.load(Ordering::Acquire) {
            return false;
        }
        let stale_after = *self.stale_after.lock().expect("index staleness lock");
        self.last_success
            .lock()
            .expect("index success lock")
            .is_some_and(|started| started.elapsed() <= stale_after)
    }

    fn succeeded(&self, started: Instant) {
        let mut last = self.last_success.lock().expect("index success lock");
        if last.is_none_or(|previous| previous < started) {
            *last = Some(started);
        }
    }

    /// Number of workers in the index.
    pub fn len(&self) -> usize {
        self.entries.read().expect("worker index lock").len()
    }

    /// Tells whether the index has no worker.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the workers matching `filter` with ids above `after_id`, at
    /// most `filter.page_size` of them, in id order: the same rows as
    /// [`Store::list`].
    pub fn list(&self, filter: &ListFilter, after_id: i64, now: DateTime<Utc>) -> Page {
        let cutoff = Cutoff::new(filter.max_heartbeat_age, now);
        let entries = self.entries.read().expect("worker index lock");

        let mut page = Page::default();
        let mut last_id = after_id;
        for (id, entry) in entries.range((Bound::Excluded(after_id), Bound::Unbounded)) {
            if !entry.matches(filter, &cutoff) {
                continue;
            }
            if page.workers.len() == filter.page_size {
                page.more_after = Some(last_id);
                break;
            }
            page.workers.push(entry.encoded());
            last_id = *id;
        }
        page
    }

    /// Records a registration this process wrote. `worker` is the record
    /// converted to protobuf for the response; it is encoded from there
    /// instead of being converted again, and left as it was.
    pub fn registered(&self, record: WorkerRecord, worker: &mut proto::Worker, token_hash: &[u8]) {
        let row = IndexRow {
            record,
            token_hash: Some(token_hash.to_vec()),
        };
        let id = row.record.id;
        let entry = Arc::new(Entry::with_worker(row, worker, Instant::now()));
        self.entries.write().expect("worker index lock").insert(id, entry);
    }

    /// Records a deregistration this process wrote. The session token hash
    /// stays as it was, as in the database.
    pub fn deregistered(&self, record: &WorkerRecord) {
        let changes = Changes {
            status: record.status,
            last_heartbeat: record.last_heartbeat,
            lease_expires: record.lease_expires,
            updated: record.updated,
        };
        self.change_many(&[record.id], Instant::now(), |_| Some(changes));
    }

    /// Records the heartbeats a flush wrote, for the workers in `written`.
    pub fn heartbeats_written(&self, batch: &[HeartbeatWrite], written: &[i64]) {
        let writes: HashMap<i64, &HeartbeatWrite> = batch.iter().map(|write| (write.worker_id, write)).collect();

        self.change_many(written, Instant::now(), |entry| {
            let write = writes.get(&entry.0)?;
            let at = write.at.trunc_subsecs(3);
            Some(Changes {
                status: write.status.unwrap_or(entry.1.changes.status),
                last_heartbeat: Some(at),
                lease_expires: Some(write.lease_expires.trunc_subsecs(3)),
                updated: at,
            })
        });
    }

    /// Records workers an expiry sweep at `now` marked inactive.
    pub fn expired(&self, ids: &[i64], now: DateTime<Utc>) {
        let updated = now.trunc_subsecs(3);
        self.change_many(ids, Instant::now(), |(_, entry)| {
            Some(Changes {
                status: Status::Inactive,
                updated,
                ..entry.changes
            })
        });
    }

    /// Applies `change` to the entries of `ids`. New entries are built
    /// outside the write lock, so a large flush does not hold up List
    /// calls. An entry replaced in the meantime keeps its newer version.
    ///
    /// NOTE: when a refresh replaced the entry with a row it read before
    /// this write was committed, the entry shows the older row until the
    /// next refresh reads it again, about one refresh interval later.
    fn change_many(&self, ids: &[i64], changed_at: Instant, change: impl Fn((i64, &Entry)) -> Option<Changes>) {
        let current: Vec<(i64, Arc<Entry>)> = {
            let entries = self.entries.read().expect("worker index lock");
            ids.iter()
                .filter_map(|id| entries.get(id).map(|entry| (*id, Arc::clone(entry))))
                .collect()
        };

        let changed: Vec<(i64, Arc<Entry>, Entry)> = current
            .into_iter()
            .filter_map(|(id, entry)| {
                let changes = change((id, &entry))?;
                let new_entry = entry.with_changes(changes, changed_at);
                Some((id, entry, new_entry))
            })
            .collect();
        if changed.is_empty() {
            return;
        }

        let mut entries = self.entries.write().expect("worker index lock");
        for (id, old, new_entry) in changed {
            if let Some(slot) = entries.get_mut(&id) {
                if Arc::ptr_eq(slot, &old) {
                    *slot = Arc::new(new_entry);
                }
            }
        }
    }

    /// Reads the whole table and replaces the index with it, keeping
    /// entries this process wrote after the read started. The table is
    /// read in pages of [`LOAD_PAGE`] rows, so the decoded JSON of only one
    /// page is in memory at a time.
    pub async fn reload(&self, store: &dyn Store) -> StoreResult<usize> {
        let started = Instant::now();
        let mut present = HashSet::new();
        let mut after_id = 0;
        loop {
            let rows = store
                .index_rows(RowSelection::After {
                    after_id,
                    limit: LOAD_PAGE,
                })
                .await?;
            let Some(last) = rows.last() else {
                break;
            };
            after_id = last.record.id;
            let full_page = rows.len() as i64 == LOAD_PAGE;

            present.extend(rows.iter().map(|row| row.record.id));
            self.insert_rows(rows, started);
            if !full_page {
                break;
            }
        }

        self.entries
            .write()
            .expect("worker index lock")
            .retain(|id, entry| present.contains(id) || entry.changed_at > started);

        self.succeeded(started);
        self.loaded.store(true, Ordering::Release);
        Ok(present.len())
    }

    /// Replaces entries with rows read from the database, except entries
    /// this process wrote after the read started.
    fn insert_rows(&self, rows: Vec<IndexRow>, started: Instant) {
        let built: Vec<(i64, Entry)> = rows
            .into_iter()
            .map(|row| (row.record.id, Entry::new(row, started)))
            .collect();
        let mut entries = self.entries.write().expect("worker index lock");
        for (id, entry) in built {
            let newer_here = entries.get(&id).is_some_and(|kept| kept.changed_at > started);
            if !newer_here {
                entries.insert(id, Arc::new(entry));
            }
        }
    }

    /// Reads the rows changed at or after `since` and applies them. When
    /// the row count then differs from the index, it also removes deleted
    /// workers and adds missing ones. Returns the number of rows read.
    pub async fn refresh(&self, store: &dyn Store, since: DateTime<Utc>) -> StoreResult<usize> {
        let started = Instant::now();
        let changes = store.index_changes(since).await?;
        let mut read = changes.rows.len();

        // Rows of workers this index has not seen, or that registered again
        // elsewhere, need their whole row.
        let mut whole_rows = Vec::new();
        let mut light = HashMap::new();
        {
            let entries = self.entries.read().expect("worker index lock");
            for change in &changes.rows {
                match entries.get(&change.id) {
                    Some(entry) if entry.changed_at > started => {}
                    Some(entry) if entry.fixed.token_hash == change.token_hash => {
                        let row_changes = changes_of(change);
                        if entry.changes != row_changes {
                            light.insert(change.id, row_changes);
                        }
                    }
                    _ => whole_rows.push(change.id),
                }
            }
        }
        let light_ids: Vec<i64> = light.keys().copied().collect();
        self.change_many(&light_ids, started, |(id, _)| light.get(&id).copied());

        let count_differs = {
            let entries = self.entries.read().expect("worker index lock");
            usize::try_from(changes.total).ok() != Some(entries.len() + count_missing(&entries, &whole_rows))
        };
        if count_differs {
            let ids = store.worker_ids().await?;
            read += ids.len();
            let present: HashSet<i64> = ids.iter().copied().collect();
            let mut entries = self.entries.write().expect("worker index lock");
            entries.retain(|id, entry| present.contains(id) || entry.changed_at > started);
            whole_rows.extend(ids.into_iter().filter(|id| !entries.contains_key(id)));
            whole_rows.sort_unstable();
            whole_rows.dedup();
        }

        if !whole_rows.is_empty() {
            let rows = store.index_rows(RowSelection::Ids(&whole_rows)).await?;
            read += rows.len();
            self.insert_rows(rows, started);
        }
        self.succeeded(started);
        Ok(read)
    }

    /// Keeps the index current until `shutdown` is cancelled. `loaded_at`
    /// is the server time at which a full load that already completed
    /// started; without one, the first tick loads the whole table. Each
    /// result goes to `observe`, which tracks database availability. Failed
    /// loads and refreshes are logged and retried at the next tick.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        clock: Clock,
        timing: IndexTiming,
        loaded_at: Option<DateTime<Utc>>,
        observe: impl Fn(&StoreResult<usize>) + Send + 'static,
        shutdown: CancellationToken,
    ) {
        let interval = timing.refresh_interval;
        *self.stale_after.lock().expect("index staleness lock") =
            (interval * STALE_AFTER_INTERVALS).max(DEFAULT_STALE_AFTER);
        let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let overlap = TimeDelta::from_std(interval + timing.flush_interval + CLOCK_MARGIN).unwrap_or(TimeDelta::MAX);
        let mut last_start = loaded_at;
        let mut last_full = Instant::now();
        let mut failures: u64 = 0;

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }

            let start = clock.now();
            let started = Instant::now();
            let full = last_start.is_none() || last_full.elapsed() >= FULL_RELOAD_EVERY;
            let result = match last_start {
                Some(previous) if !full => self.refresh(store.as_ref(), previous - overlap).await,
                _ => self.reload(store.as_ref()).await,
            };
            observe(&result);

            match result {
                Ok(read) => {
                    let elapsed_ms = started.elapsed().as_millis() as u64;
                    if last_start.is_none() {
                        info!(workers = read, elapsed_ms, "worker index loaded");
                    } else {
                        debug!(rows = read, full, elapsed_ms, "worker index refreshed");
                    }
                    if full {
                        last_full = started;
                    }
                    last_start = Some(start);
                    failures = 0;
                }
                Err(error) => {
                    failures += 1;
                    // Log the first failure and then every 30th, so an outage does not flood the log.
                    if failures == 1 || failures % 30 == 0 {
                        warn!(error = %error, failures, full, "worker index refresh failed; retrying at the next tick");
                    }
                }
            }
        }
    }
}

/// How often the index reads the database.
#[derive(Debug, Clone, Copy)]
pub struct IndexTiming {
    /// Time between refreshes.
    pub refresh_interval: Duration,
    /// The flush interval of heartbeat writes, which delays the `updated`
    /// times a refresh must reach back to.
    pub flush_interval: Duration,
}

/// Number of `ids` that are not in the index yet.
fn count_missing(entries: &BTreeMap<i64, Arc<Entry>>, ids: &[i64]) -> usize {
    ids.iter().filter(|id| !entries.contains_key(id)).count()
}

fn changes_of(change: &RowChange) -> Changes {
    Changes {
        status: change.status,
        last_heartbeat: change.last_heartbeat,
        lease_expires: change.lease_expires,
        updated: change.updated,
    }
}
