//! Contract tests of the [`Store`] trait, run on SQLite always and on
//! PostgreSQL when `REGISTRY_TEST_POSTGRES_URL` is set.
//!
//! Each contract test is an async function over a [`Fixture`], and
//! `contract_tests!` instantiates it once per backend.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use prost::Message;
use registry_server::index::WorkerIndex;
use registry_server::service::worker_to_proto;
use registry_server::store::{
    HeartbeatWrite, LeaseCounts, LeaseGrant, RowSelection, Store, StoreError, StoreResult, Sweep, WorkerRecord,
};
use serde_json::json;
use worker_registry::domain::{Role, Status};
use worker_registry::proto;
use worker_registry::validation::{ListFilter, Registration, RuntimeSpec};

use support::Fixture;

/// Granted heartbeat interval in every registration of this suite.
const INTERVAL: Duration = Duration::from_secs(30);
/// Lease TTL in every registration of this suite: three missed heartbeats.
const TTL: Duration = Duration::from_secs(90);
/// A time since the database was regained that is past every TTL, so no
/// lease is in its grace period.
const NO_GRACE: Duration = Duration::from_secs(3600);

/// Instantiates each contract test once per backend.
macro_rules! contract_tests {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[doc = concat!("Runs `", stringify!($test), "` on SQLite.")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let fixture = super::Fixture::sqlite().await;
                    super::$test(&fixture).await;
                }
            )*
        }

        mod postgres {
            $(
                #[doc = concat!("Runs `", stringify!($test), "` on PostgreSQL.")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let Some(fixture) = super::Fixture::postgres(stringify!($test)).await else {
                        return;
                    };
                    super::$test(&fixture).await;
                }
            )*
        }
    };
}

contract_tests!(
    register_creates_worker,
    roles_round_trip,
    statuses_round_trip,
    register_same_instance_takes_over,
    register_other_instance_rejected_while_live,
    register_takeover_after_expiry,
    register_takeover_after_deregister,
    register_respects_grace,
    concurrent_register_same_instance,
    concurrent_register_different_instances,
    register_batch_matches_single,
    heartbeat_renews_lease,
    heartbeat_stale_token_updates_nothing,
    heartbeat_batch_mixed,
    deregister_twice,
    deregister_unknown_and_superseded,
    expire_marks_lapsed_workers,
    expire_respects_exclude_and_limit,
    expire_respects_grace,
    count_leases_skips_excluded,
    lease_deadline_is_inclusive,
    sub_millisecond_times_agree,
    concurrent_expire_returns_each_once,
    list_filters_each,
    list_filters_combined,
    list_huge_heartbeat_age,
    list_keyset_pages,
    sql_default_timestamps_compare,
    index_changes_reads_changed_rows,
    index_entries_match_records,
    index_follows_outside_changes,
    index_keeps_newer_local_writes,
    index_loads_in_pages,
);

// Helpers.

/// Fixed, millisecond-aligned start time of most tests.
fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 31, 12, 0, 0).unwrap()
}

/// Returns `t0` plus `ms` milliseconds.
fn at(ms: i64) -> DateTime<Utc> {
    t0() + TimeDelta::milliseconds(ms)
}

/// Returns a 32-byte token hash filled with `seed`.
fn token(seed: u8) -> Vec<u8> {
    vec![seed; 32]
}

/// Returns `duration` as a chrono delta.
fn delta(duration: Duration) -> TimeDelta {
    TimeDelta::from_std(duration).unwrap()
}

/// Builds a sensor registration without runtimes or labels.
fn registration(name: &str, instance_id: &str) -> Registration {
    Registration {
        name: name.to_string(),
        role: Role::Sensor,
        host: format!("host-{instance_id}"),
        runtimes: Vec::new(),
        labels: BTreeMap::new(),
        extra_capabilities: serde_json::Map::new(),
        instance_id: instance_id.to_string(),
        requested_interval: None,
    }
}

/// Builds a registration with a role, runtimes and labels.
fn registration_with(name: &str, role: Role, runtimes: &[&str], labels: &[(&str, &str)]) -> Registration {
    let runtimes = runtimes
        .iter()
        .map(|runtime| RuntimeSpec {
            name: runtime.to_string(),
            version: "1.0".to_string(),
            path: format!("/usr/bin/{runtime}"),
        })
        .collect();
    let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Registration {
        role,
        runtimes,
        labels,
        ..registration(name, &format!("instance-{name}"))
    }
}

/// Registers with the suite's interval and TTL and no grace period.
async fn register(
    store: &dyn Store,
    registration: &Registration,
    token_hash: &[u8],
    now: DateTime<Utc>,
) -> StoreResult<WorkerRecord> {
    register_with_grace(store, registration, token_hash, now, NO_GRACE).await
}

/// Registers with the suite's interval and TTL and the given time since
/// the database was regained.
async fn register_with_grace(
    store: &dyn Store,
    registration: &Registration,
    token_hash: &[u8],
    now: DateTime<Utc>,
    since_regained: Duration,
) -> StoreResult<WorkerRecord> {
    let capabilities = registration.capabilities_document();
    let grant = LeaseGrant {
        registration,
        capabilities: &capabilities,
        token_hash,
        heartbeat_interval: INTERVAL,
        lease_ttl: TTL,
        now,
        since_regained,
    };
    store.register(&grant).await
}

/// Builds a heartbeat that renews the lease by the suite's TTL.
fn heartbeat(worker_id: i64, token_hash: &[u8], at: DateTime<Utc>, status: Option<Status>) -> HeartbeatWrite {
    HeartbeatWrite {
        worker_id,
        token_hash: token_hash.to_vec(),
        at,
        lease_expires: at + delta(TTL),
        status,
    }
}

/// Builds a sweep without exclusions.
fn sweep(now: DateTime<Utc>, since_regained: Duration, limit: i64) -> Sweep {
    Sweep {
        now,
        since_regained,
        limit,
        exclude_ids: Vec::new(),
    }
}

/// Builds a filter that matches everything, one page of up to 1000.
fn all_workers() -> ListFilter {
    ListFilter {
        page_size: 1000,
        ..ListFilter::default()
    }
}

/// Lists the names of the workers matching `filter` at `now`, sorted.
/// A worker index loaded from the same store must list the same names.
async fn names(store: &dyn Store, filter: &ListFilter, now: DateTime<Utc>) -> Vec<String> {
    let mut names: Vec<String> = store
        .list(filter, 0, now)
        .await
        .expect("list failed")
        .into_iter()
        .map(|worker| worker.name)
        .collect();
    names.sort();

    let index = WorkerIndex::new();
    index.reload(store).await.expect("index load failed");
    assert_eq!(
        index_names(&index, filter, now),
        names,
        "the index and the store disagree"
    );
    names
}

/// Lists the names of the workers in `index` matching `filter` at `now`, sorted.
fn index_names(index: &WorkerIndex, filter: &ListFilter, now: DateTime<Utc>) -> Vec<String> {
    let mut names: Vec<String> = index_workers(index, filter, now)
        .into_iter()
        .map(|worker| worker.name)
        .collect();
    names.sort();
    names
}

/// Decodes the first page of `index` for `filter` at `now`.
fn index_workers(index: &WorkerIndex, filter: &ListFilter, now: DateTime<Utc>) -> Vec<proto::Worker> {
    index
        .list(filter, 0, now)
        .workers
        .iter()
        .map(|encoded| proto::Worker::decode(encoded.to_vec().as_slice()).expect("index entry decodes"))
        .collect()
}

/// Reads a worker that must exist.
async fn get(store: &dyn Store, id: i64) -> WorkerRecord {
    store
        .get_by_id(id)
        .await
        .expect("get_by_id failed")
        .unwrap_or_else(|| panic!("worker {id} not found"))
}

// Registration.

/// Proves that a register batch gives each grant the result a single
/// register would: new rows, takeover by the same instance, ALREADY_EXISTS
/// against a live holder, and a name repeated in the batch applied in order.
async fn register_batch_matches_single(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let held = register(store, &registration("held", "holder"), &token(1), t0())
        .await
        .unwrap();
    let own = register(store, &registration("own", "same"), &token(2), t0())
        .await
        .unwrap();

    let registrations = [
        registration("fresh-a", "a"),
        registration("held", "intruder"),
        registration("own", "same"),
        registration("fresh-b", "b"),
        registration("fresh-a", "a"),
    ];
    let documents: Vec<_> = registrations.iter().map(Registration::capabilities_document).collect();
    let hashes: Vec<Vec<u8>> = (0..registrations.len()).map(|index| token(10 + index as u8)).collect();
    let grants: Vec<LeaseGrant<'_>> = registrations
        .iter()
        .zip(&documents)
        .zip(&hashes)
        .map(|((registration, capabilities), token_hash)| LeaseGrant {
            registration,
            capabilities,
            token_hash,
            heartbeat_interval: INTERVAL,
            lease_ttl: TTL,
            now: at(1000),
            since_regained: NO_GRACE,
        })
        .collect();

    let results = store.register_batch(&grants).await;

    assert_eq!(results.len(), grants.len());
    let fresh_a = results[0].as_ref().expect("new name registered");
    assert_eq!(fresh_a.name, "fresh-a");
    assert!(
        matches!(&results[1], Err(StoreError::AlreadyExists { instance_id, .. }) if instance_id == "holder"),
        "a live holder keeps its name: {:?}",
        results[1]
    );
    assert_eq!(results[2].as_ref().expect("same instance takes over").id, own.id);
    assert_eq!(results[3].as_ref().expect("second new name").name, "fresh-b");
    let repeated = results[4].as_ref().expect("repeated name in the batch");
    assert_eq!(repeated.id, fresh_a.id, "a repeated name keeps its id");

    let stored = store.get_by_name("fresh-a").await.unwrap().unwrap();
    let session = store.session(stored.id).await.unwrap().unwrap();
    assert_eq!(
        session.token_hash,
        Some(token(14)),
        "the later grant of a repeated name wins"
    );
    let holder = store.session(held.id).await.unwrap().unwrap();
    assert_eq!(holder.token_hash, Some(token(1)), "the holder's session is untouched");
    assert_eq!(store.list(&all_workers(), 0, at(1000)).await.unwrap().len(), 4);
}

/// Proves that a new registration stores every field of the grant and starts an active lease.
async fn register_creates_worker(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let registration = registration_with("sensor-1", Role::Sensor, &["python", "shell"], &[("zone", "a")]);

    let record = register(store, &registration, &token(1), t0()).await.unwrap();

    assert!(record.id > 0);
    assert_eq!(record.name, "sensor-1");
    assert_eq!(record.role, Role::Sensor);
    assert_eq!(record.status, Status::Active);
    assert_eq!(record.host, "host-instance-sensor-1");
    assert_eq!(record.instance_id, "instance-sensor-1");
    assert_eq!(record.capabilities, registration.capabilities_document());
    assert_eq!(record.capabilities["runtimes"], json!(["python", "shell"]));
    assert_eq!(record.last_heartbeat, Some(t0()));
    assert_eq!(record.lease_expires, Some(t0() + delta(TTL)));
    assert_eq!(record.lease_ttl, TTL);
    assert_eq!(record.heartbeat_interval, INTERVAL);
    assert_eq!(record.created, t0());
    assert_eq!(record.updated, t0());

    let stored = get(store, record.id).await;
    assert_eq!(stored, record);
    let by_name = store.get_by_name("sensor-1").await.unwrap();
    assert_eq!(by_name, Some(record.clone()));

    let session = store.session(record.id).await.unwrap().expect("session missing");
    assert_eq!(session.id, record.id);
    assert_eq!(session.name, "sensor-1");
    assert_eq!(session.status, Status::Active);
    assert_eq!(session.token_hash, Some(token(1)));
    assert_eq!(session.instance_id, "instance-sensor-1");
    assert_eq!(session.lease_expires, Some(t0() + delta(TTL)));
    assert_eq!(session.lease_ttl, TTL);
    assert_eq!(session.heartbeat_interval, INTERVAL);

    assert_eq!(store.get_by_id(record.id + 1000).await.unwrap(), None);
    assert_eq!(store.get_by_name("sensor-2").await.unwrap(), None);
    assert_eq!(store.session(record.id + 1000).await.unwrap(), None);
}

/// Proves that every role is stored and read back as written.
async fn roles_round_trip(fixture: &Fixture) {
    let store = fixture.store.as_ref();

    for role in Role::ALL {
        let name = format!("worker-{role}");
        let record = register(store, &registration_with(&name, role, &[], &[]), &token(1), t0())
            .await
            .unwrap();
        assert_eq!(record.role, role, "returned role of {name}");
        assert_eq!(get(store, record.id).await.role, role, "stored role of {name}");

        let filter = ListFilter {
            role: Some(role),
            ..all_workers()
        };
        assert_eq!(
            names(store, &filter, t0()).await,
            vec![name.clone()],
            "list by role {role}"
        );
    }
}

/// Proves that every status is stored and read back, and that a status filter selects it.
async fn statuses_round_trip(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let mut ids = HashMap::new();
    for status in Status::ALL {
        let name = format!("worker-{status}");
        let record = register(store, &registration(&name, "i1"), &token(1), t0())
            .await
            .unwrap();
        ids.insert(status, record.id);
    }

    // The API writes busy through a heartbeat and inactive through
    // deregister; only an operator writes error, here by raw SQL.
    let busy = heartbeat(ids[&Status::Busy], &token(1), at(1000), Some(Status::Busy));
    assert_eq!(store.write_heartbeats(&[busy]).await.unwrap(), vec![ids[&Status::Busy]]);
    store
        .deregister(ids[&Status::Inactive], &token(1), at(1000))
        .await
        .unwrap();
    let changed = fixture
        .execute("UPDATE worker SET status = 'error' WHERE name = 'worker-error'")
        .await;
    assert_eq!(changed, 1);

    for status in Status::ALL {
        let id = ids[&status];
        assert_eq!(get(store, id).await.status, status, "stored status of worker-{status}");
        let session = store.session(id).await.unwrap().unwrap();
        assert_eq!(session.status, status, "session status of worker-{status}");

        let filter = ListFilter {
            statuses: vec![status],
            ..all_workers()
        };
        assert_eq!(
            names(store, &filter, at(1000)).await,
            vec![format!("worker-{status}")],
            "list by status {status}"
        );
    }
}

/// Proves that the same instance takes over its own live lease at once, keeping id and created.
async fn register_same_instance_takes_over(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let first = register(store, &registration("w1", "i1"), &token(1), t0())
        .await
        .unwrap();

    let mut again = registration_with("w1", Role::Hybrid, &["node"], &[]);
    again.instance_id = "i1".to_string();
    again.host = "moved-host".to_string();
    let second = register(store, &again, &token(2), at(5000)).await.unwrap();

    assert_eq!(second.id, first.id);
    assert_eq!(second.created, first.created);
    assert_eq!(second.updated, at(5000));
    assert_eq!(second.last_heartbeat, Some(at(5000)));
    assert_eq!(second.lease_expires, Some(at(5000) + delta(TTL)));
    assert_eq!(second.role, Role::Hybrid);
    assert_eq!(second.host, "moved-host");
    assert_eq!(second.capabilities["runtimes"], json!(["node"]));
    assert_eq!(
        store.session(first.id).await.unwrap().unwrap().token_hash,
        Some(token(2))
    );

    // The first session is fenced off.
    let stale = heartbeat(first.id, &token(1), at(6000), None);
    assert_eq!(store.write_heartbeats(&[stale]).await.unwrap(), Vec::<i64>::new());
}

/// Proves that another instance gets AlreadyExists naming the holder while the lease is live.
async fn register_other_instance_rejected_while_live(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let first = register(store, &registration("w1", "i1"), &token(1), t0())
        .await
        .unwrap();

    let error = register(store, &registration("w1", "i2"), &token(2), at(89_000))
        .await
        .unwrap_err();

    match error {
        StoreError::AlreadyExists {
            name,
            host,
            instance_id,
        } => {
            assert_eq!(name, "w1");
            assert_eq!(host, "host-i1");
            assert_eq!(instance_id, "i1");
        }
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(
        get(store, first.id).await,
        first,
        "the rejected register changed the row"
    );
}

/// Proves that anyone takes over a lapsed lease, keeping the id.
async fn register_takeover_after_expiry(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let first = register(store, &registration("w1", "i1"), &token(1), t0())
        .await
        .unwrap();
    let lapsed = t0() + delta(TTL) + TimeDelta::milliseconds(1);

    let second = register(store, &registration("w1", "i2"), &token(2), lapsed)
        .await
        .unwrap();

    assert_eq!(second.id, first.id);
    assert_eq!(second.instance_id, "i2");
    assert_eq!(second.host, "host-i2");
    assert_eq!(second.status, Status::Active);
    assert_eq!(second.created, first.created);

    // A takeover also works after a sweep marked the worker inactive.
    let later = lapsed + delta(TTL) + TimeDelta::milliseconds(1);
    let expired = store.expire(&sweep(later, NO_GRACE, 100)).await.unwrap();
    assert_eq!(expired.len(), 1);
    let third = register(store, &registration("w1", "i3"), &token(3), later)
        .await
        .unwrap();
    assert_eq!(third.id, first.id);
    assert_eq!(third.status, Status::Active);
    assert_eq!(third.instance_id, "i3");
}

/// Proves that anyone takes over a deregistered worker at once, keeping the id.
async fn register_takeover_after_deregister(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let first = register(store, &registration("w1", "i1"), &token(1), t0())
        .await
        .unwrap();
    store.deregister(first.id, &token(1), at(1000)).await.unwrap();

    let second = register(store, &registration("w1", "i2"), &token(2), at(2000))
        .await
        .unwrap();

    assert_eq!(second.id, first.id);
    assert_eq!(second.instance_id, "i2");
    assert_eq!(second.status, Status::Active);
    assert_eq!(
        store.session(first.id).await.unwrap().unwrap().token_hash,
        Some(token(2))
    );
}

/// Proves that a lapsed lease still blocks other instances while the registry's grace period runs.
async fn register_respects_grace(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    register(store, &registration("w1", "i1"), &token(1), t0())
        .await
        .unwrap();
    let lapsed = t0() + delta(TTL) + TimeDelta::seconds(10);

    let in_grace = TTL - Duration::from_millis(1);
    let error = register_with_grace(store, &registration("w1", "i2"), &token(2), lapsed, in_grace)
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::AlreadyExists { .. }), "got {error:?}");

    let record = register_with_grace(store, &registration("w1", "i2"), &token(2), lapsed, TTL)
        .await
        .unwrap();
    assert_eq!(record.instance_id, "i2");
}

/// Proves that 20 concurrent registers of one instance all succeed on one row.
async fn concurrent_register_same_instance(fixture: &Fixture) {
    let results = register_concurrently(fixture.store.clone(), 20, |_| "i1".to_string()).await;

    let ids: BTreeSet<i64> = results
        .iter()
        .map(|result| match result {
            Ok(record) => record.id,
            Err(error) => panic!("concurrent register failed: {error:?}"),
        })
        .collect();
    assert_eq!(ids.len(), 1, "registers created several ids: {ids:?}");
    assert_eq!(
        names(fixture.store.as_ref(), &all_workers(), t0()).await,
        vec!["shared"]
    );

    // The stored token is one of the 20 issued.
    let id = *ids.first().unwrap();
    let session = fixture.store.session(id).await.unwrap().unwrap();
    let stored_seed = session.token_hash.unwrap()[0];
    assert!(
        (1..=20).contains(&stored_seed),
        "unexpected stored token seed {stored_seed}"
    );
}

/// Proves that of 20 concurrent registers by different instances exactly one wins and the rest get AlreadyExists.
async fn concurrent_register_different_instances(fixture: &Fixture) {
    let results = register_concurrently(fixture.store.clone(), 20, |index| format!("i{index}")).await;

    let mut winners = Vec::new();
    for result in &results {
        match result {
            Ok(record) => winners.push(record.clone()),
            Err(StoreError::AlreadyExists { name, .. }) => assert_eq!(name, "shared"),
            Err(other) => panic!("concurrent register failed: {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(
        names(fixture.store.as_ref(), &all_workers(), t0()).await,
        vec!["shared"]
    );

    let stored = get(fixture.store.as_ref(), winners[0].id).await;
    assert_eq!(stored.instance_id, winners[0].instance_id);
    for result in &results {
        if let Err(StoreError::AlreadyExists { instance_id, .. }) = result {
            assert_eq!(
                instance_id, &winners[0].instance_id,
                "AlreadyExists names the wrong holder"
            );
        }
    }
}

/// Runs `count` registers of the name `shared` at once. The instance id of
/// each comes from `instance_of`, and register `i` uses token seed `i + 1`.
async fn register_concurrently(
    store: Arc<dyn Store>,
    count: usize,
    instance_of: impl Fn(usize) -> String,
) -> Vec<StoreResult<WorkerRecord>> {
    let barrier = Arc::new(tokio::sync::Barrier::new(count));
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let store = store.clone();
        let barrier = barrier.clone();
        let registration = registration("shared", &instance_of(index));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            register(store.as_ref(), &registration, &token(index as u8 + 1), t0()).await
        }));
    }

    let mut results = Vec::with_capacity(count);
    for task in tasks {
        results.push(task.await.expect("register task panicked"));
    }
    results
}

// Heartbeats.

/// Proves that a heartbeat renews the lease and writes the reported status, keeping it when none is reported.
async fn heartbeat_renews_lease(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let record = register(store, &registration("w1", "i1"), &token(1), t0())
        .await
        .unwrap();

    assert_eq!(store.write_heartbeats(&[]).await.unwrap(), Vec::<i64>::new());

    let busy = heartbeat(record.id, &token(1), at(30_000), Some(Status::Busy));
    assert_eq!(store.write_heartbeats(&[busy]).await.unwrap(), vec![record.id]);
    let stored = get(store, record.id).await;
    assert_eq!(stored.last_heartbeat, Some(at(30_000)));
    assert_eq!(stored.lease_expires, Some(at(30_000) + delta(TTL)));
    assert_eq!(stored.updated, at(30_000));
    assert_eq!(stored.status, Status::Busy);
    assert_eq!(stored.created, t0());

    let keep = heartbeat(record.id, &token(1), at(60_000), None);
    assert_eq!(store.write_heartbeats(&[keep]).await.unwrap(), vec![record.id]);
    let stored = get(store, record.id).await;
    assert_eq!(stored.status, Status::Busy, "a heartbeat without status changed it");
    assert_eq!(stored.last_heartbeat, Some(at(60_000)));

    let active = heartbeat(record.id, &token(1), at(90_000), Some(Status::Active));
    assert_eq!(store.write_heartbeats(&[active]).await.unwrap(), vec![record.id]);
    assert_eq!(get(store, record.id).await.status, Status::Active);

    // The renewed lease is what the sweeper reads.
    let before_renewed_deadline = at(90_000) + delta(TTL) - TimeDelta::milliseconds(1);
    let expired = store
        .expire(&sweep(before_renewed_deadline, NO_GRACE, 100))
        .await
        .unwrap();
    assert_eq!(expired, Vec::new());
}

/// Proves that heartbeats with a stale token, an unknown id or an ended lease update nothing.
async fn heartbeat_stale_token_updates_nothing(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let record = register(store, &registration("w1", "i1"), &token(1), t0())
        .await
        .unwrap();
    register(store, &registration("w1", "i1"), &token(2), at(1000))
        .await
        .unwrap();
    let before = get(store, record.id).await;

    let stale = heartbeat(record.id, &token(1), at(2000), Some(Status::Busy));
    assert_eq!(store.write_heartbeats(&[stale]).await.unwrap(), Vec::<i64>::new());
    assert_eq!(get(store, record.id).await, before, "a stale heartbeat changed the row");

    let unknown = heartbeat(record.id + 1000, &token(2), at(2000), None);
    assert_eq!(store.write_heartbeats(&[unknown]).await.unwrap(), Vec::<i64>::new());

    // An expired worker stays inactive even with its current token.
    let lapsed = at(1000) + delta(TTL) + TimeDelta::milliseconds(1);
    assert_eq!(store.expire(&sweep(lapsed, NO_GRACE, 100)).await.unwrap().len(), 1);
    let expired_before = get(store, record.id).await;
    let late = heartbeat(record.id, &token(2), lapsed, Some(Status::Active));
    assert_eq!(store.write_heartbeats(&[late]).await.unwrap(), Vec::<i64>::new());
    assert_eq!(get(store, record.id).await, expired_before);
    assert_eq!(expired_before.status, Status::Inactive);

    // So does an error status set by an operator.
    let other = register(store, &registration("w2", "i1"), &token(3), t0())
        .await
        .unwrap();
    fixture
        .execute("UPDATE worker SET status = 'error' WHERE name = 'w2'")
        .await;
    let on_error = heartbeat(other.id, &token(3), at(1000), None);
    assert_eq!(store.write_heartbeats(&[on_error]).await.unwrap(), Vec::<i64>::new());
    assert_eq!(get(store, other.id).await.status, Status::Error);
}

/// Proves that one batch updates exactly its valid heartbeats.
async fn heartbeat_batch_mixed(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let mut valid = Vec::new();
    let mut batch = Vec::new();
    for index in 0..10u8 {
        let record = register(store, &registration(&format!("w{index}"), "i1"), &token(index), t0())
            .await
            .unwrap();
        if index % 2 == 0 {
            valid.push(record.id);
            batch.push(heartbeat(record.id, &token(index), at(20_000), None));
        } else {
            batch.push(heartbeat(record.id, &token(index + 100), at(20_000), None));
        }
    }

    let mut updated = store.write_heartbeats(&batch).await.unwrap();
    updated.sort_unstable();

    assert_eq!(updated, valid);
    for id in valid {
        assert_eq!(
            get(store, id).await.last_heartbeat,
            Some(at(20_000)),
            "heartbeat of worker {id} was not written"
        );
    }
}

// Deregistration.

/// Proves that deregister ends the lease and that repeating it with the same token succeeds.
async fn deregister_twice(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let record = register(store, &registration("w1", "i1"), &token(1), t0())
        .await
        .unwrap();

    let first = store.deregister(record.id, &token(1), at(1000)).await.unwrap();
    assert_eq!(first.id, record.id);
    assert_eq!(first.status, Status::Inactive);
    assert_eq!(first.lease_expires, Some(at(1000)));
    assert_eq!(first.updated, at(1000));
    assert_eq!(get(store, record.id).await, first);

    let second = store.deregister(record.id, &token(1), at(2000)).await.unwrap();
    assert_eq!(second.id, record.id);
    assert_eq!(second.status, Status::Inactive);

    let after = heartbeat(record.id, &token(1), at(3000), None);
    assert_eq!(store.write_heartbeats(&[after]).await.unwrap(), Vec::<i64>::new());
    assert_eq!(get(store, record.id).await.status, Status::Inactive);

    let live = store.count_leases(&sweep(at(3000), NO_GRACE, 100)).await.unwrap();
    assert_eq!(live, LeaseCounts { live: 0, expirable: 0 });
}

/// Proves that deregister reports NotFound for an unknown id and Superseded for a replaced token.
async fn deregister_unknown_and_superseded(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let record = register(store, &registration("w1", "i1"), &token(1), t0())
        .await
        .unwrap();

    let unknown = store
        .deregister(record.id + 1000, &token(1), at(1000))
        .await
        .unwrap_err();
    assert!(matches!(unknown, StoreError::NotFound), "got {unknown:?}");

    let wrong = store.deregister(record.id, &token(9), at(1000)).await.unwrap_err();
    assert!(matches!(wrong, StoreError::Superseded), "got {wrong:?}");
    assert_eq!(get(store, record.id).await.status, Status::Active);

    // After a deregister and a takeover, the old token is superseded.
    store.deregister(record.id, &token(1), at(1000)).await.unwrap();
    register(store, &registration("w1", "i2"), &token(2), at(2000))
        .await
        .unwrap();
    let old = store.deregister(record.id, &token(1), at(3000)).await.unwrap_err();
    assert!(matches!(old, StoreError::Superseded), "got {old:?}");
    assert_eq!(get(store, record.id).await.status, Status::Active);
}

// Expiry.

/// Proves that a sweep marks exactly the lapsed live workers inactive, once, and returns them.
async fn expire_marks_lapsed_workers(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let early = register(store, &registration("early", "i1"), &token(1), t0())
        .await
        .unwrap();
    let middle = register(store, &registration("middle", "i1"), &token(1), at(10_000))
        .await
        .unwrap();
    let late = register(store, &registration("late", "i1"), &token(1), at(60_000))
        .await
        .unwrap();
    let stopped = register(store, &registration("stopped", "i1"), &token(1), t0())
        .await
        .unwrap();
    store.deregister(stopped.id, &token(1), at(1)).await.unwrap();
    let broken = register(store, &registration("broken", "i1"), &token(1), t0())
        .await
        .unwrap();
    fixture
        .execute("UPDATE worker SET status = 'error' WHERE name = 'broken'")
        .await;
    let busy = register(store, &registration("busy", "i1"), &token(1), t0())
        .await
        .unwrap();
    store
        .write_heartbeats(&[heartbeat(busy.id, &token(1), at(5000), Some(Status::Busy))])
        .await
        .unwrap();

    // At this time early, busy and middle have lapsed, late has not.
    let now = at(10_000) + delta(TTL) + TimeDelta::milliseconds(1);
    let counts = store.count_leases(&sweep(now, NO_GRACE, 100)).await.unwrap();
    assert_eq!(counts, LeaseCounts { live: 4, expirable: 3 });

    let expired = store.expire(&sweep(now, NO_GRACE, 100)).await.unwrap();

    let mut expired_ids: Vec<i64> = expired.iter().map(|worker| worker.id).collect();
    expired_ids.sort_unstable();
    assert_eq!(expired_ids, vec![early.id, middle.id, busy.id]);
    let early_entry = expired.iter().find(|worker| worker.id == early.id).unwrap();
    assert_eq!(early_entry.name, "early");
    assert_eq!(early_entry.last_heartbeat, Some(t0()));
    let busy_entry = expired.iter().find(|worker| worker.id == busy.id).unwrap();
    assert_eq!(busy_entry.last_heartbeat, Some(at(5000)));

    for id in [early.id, middle.id, busy.id, stopped.id] {
        assert_eq!(get(store, id).await.status, Status::Inactive, "worker {id}");
    }
    let early_after = get(store, early.id).await;
    assert_eq!(early_after.updated, now);
    assert_eq!(early_after.last_heartbeat, Some(t0()), "expiry changed last_heartbeat");
    assert_eq!(get(store, late.id).await.status, Status::Active);
    assert_eq!(get(store, broken.id).await.status, Status::Error);

    assert_eq!(store.expire(&sweep(now, NO_GRACE, 100)).await.unwrap(), Vec::new());
    let counts = store.count_leases(&sweep(now, NO_GRACE, 100)).await.unwrap();
    assert_eq!(counts, LeaseCounts { live: 1, expirable: 0 });
}

/// Proves that a sweep skips excluded workers and expires at most `limit`, earliest deadline first.
async fn expire_respects_exclude_and_limit(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let mut ids = Vec::new();
    for index in 0..5 {
        let record = register(
            store,
            &registration(&format!("w{index}"), "i1"),
            &token(1),
            at(index * 1000),
        )
        .await
        .unwrap();
        ids.push(record.id);
    }
    let now = at(10_000) + delta(TTL);
    let excluded = Sweep {
        exclude_ids: vec![ids[0]],
        ..sweep(now, NO_GRACE, 2)
    };

    let first: Vec<i64> = store.expire(&excluded).await.unwrap().iter().map(|w| w.id).collect();
    assert_eq!(first, vec![ids[1], ids[2]]);

    let second: Vec<i64> = store.expire(&excluded).await.unwrap().iter().map(|w| w.id).collect();
    assert_eq!(second, vec![ids[3], ids[4]]);

    assert_eq!(store.expire(&excluded).await.unwrap(), Vec::new());
    assert_eq!(get(store, ids[0]).await.status, Status::Active);

    let zero = store.expire(&sweep(now, NO_GRACE, 0)).await.unwrap();
    assert_eq!(zero, Vec::new(), "a sweep with limit 0 expired workers");
    let all: Vec<i64> = store
        .expire(&sweep(now, NO_GRACE, 10))
        .await
        .unwrap()
        .iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(all, vec![ids[0]]);
}

/// Proves that count_leases leaves excluded workers out of the expirable count.
async fn count_leases_skips_excluded(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let mut ids = Vec::new();
    for index in 0..5 {
        let record = register(store, &registration(&format!("w{index}"), "i1"), &token(1), t0())
            .await
            .unwrap();
        ids.push(record.id);
    }
    let now = t0() + delta(TTL) + TimeDelta::seconds(1);

    let counts = store.count_leases(&sweep(now, NO_GRACE, 100)).await.unwrap();
    assert_eq!(counts, LeaseCounts { live: 5, expirable: 5 });

    let excluded = Sweep {
        exclude_ids: vec![ids[0], ids[3]],
        ..sweep(now, NO_GRACE, 100)
    };
    let counts = store.count_leases(&excluded).await.unwrap();
    assert_eq!(counts, LeaseCounts { live: 5, expirable: 3 });
}

/// Proves that no worker expires before its own TTL has passed since the database was regained.
async fn expire_respects_grace(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let record = register(store, &registration("w1", "i1"), &token(1), t0())
        .await
        .unwrap();
    let now = t0() + delta(TTL) * 3;
    let in_grace = TTL - Duration::from_millis(1);

    let counts = store.count_leases(&sweep(now, in_grace, 100)).await.unwrap();
    assert_eq!(counts, LeaseCounts { live: 1, expirable: 0 });
    assert_eq!(store.expire(&sweep(now, in_grace, 100)).await.unwrap(), Vec::new());
    assert_eq!(
        store.expire(&sweep(now, Duration::ZERO, 100)).await.unwrap(),
        Vec::new()
    );
    assert_eq!(get(store, record.id).await.status, Status::Active);

    let expired = store.expire(&sweep(now, TTL, 100)).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].id, record.id);
}

/// Proves that a lease is live up to and including its deadline, and lapsed one millisecond later.
async fn lease_deadline_is_inclusive(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    register(store, &registration("w1", "i1"), &token(1), t0())
        .await
        .unwrap();
    let deadline = t0() + delta(TTL);

    assert_eq!(store.expire(&sweep(deadline, NO_GRACE, 100)).await.unwrap(), Vec::new());
    let error = register(store, &registration("w1", "i2"), &token(2), deadline)
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::AlreadyExists { .. }), "got {error:?}");

    let after = deadline + TimeDelta::milliseconds(1);
    assert_eq!(store.expire(&sweep(after, NO_GRACE, 100)).await.unwrap().len(), 1);
}

/// Proves that times with sub-millisecond parts compare as their millisecond truncation on both backends.
async fn sub_millisecond_times_agree(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let registered = t0() + TimeDelta::microseconds(400);
    let record = register(store, &registration("w1", "i1"), &token(1), registered)
        .await
        .unwrap();

    // 300 µs past the exact deadline but inside the same millisecond.
    let now = registered + delta(TTL) + TimeDelta::microseconds(300);
    assert_eq!(store.expire(&sweep(now, NO_GRACE, 100)).await.unwrap(), Vec::new());
    let error = register(store, &registration("w1", "i2"), &token(2), now)
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::AlreadyExists { .. }), "got {error:?}");

    let stored = get(store, record.id).await;
    assert_eq!(stored.last_heartbeat, Some(t0()));
    assert_eq!(stored.lease_expires, Some(t0() + delta(TTL)));

    let next_millisecond = t0() + delta(TTL) + TimeDelta::milliseconds(1);
    assert_eq!(
        store
            .expire(&sweep(next_millisecond, NO_GRACE, 100))
            .await
            .unwrap()
            .len(),
        1
    );
}

/// Proves that two stores sweeping one database at once return each lapsed worker exactly once.
async fn concurrent_expire_returns_each_once(fixture: &Fixture) {
    const WORKERS: usize = 60;
    let store = fixture.store.as_ref();
    let mut all_ids = Vec::new();
    for index in 0..WORKERS {
        let record = register(store, &registration(&format!("w{index:02}"), "i1"), &token(1), t0())
            .await
            .unwrap();
        all_ids.push(record.id);
    }
    let now = t0() + delta(TTL) + TimeDelta::seconds(1);

    let replicas = [fixture.store.clone(), fixture.open_replica().await];
    let mut tasks = Vec::new();
    for replica in replicas {
        tasks.push(tokio::spawn(async move {
            let mut expired = Vec::new();
            // Bounded: 60 workers need at most 12 sweeps of 5 from one replica.
            for _ in 0..50 {
                let batch = replica.expire(&sweep(now, NO_GRACE, 5)).await.expect("expire failed");
                if batch.is_empty() {
                    break;
                }
                expired.extend(batch.into_iter().map(|worker| worker.id));
            }
            expired
        }));
    }

    let mut returned = Vec::new();
    for task in tasks {
        returned.extend(task.await.expect("sweep task panicked"));
    }
    returned.sort_unstable();
    all_ids.sort_unstable();
    assert_eq!(returned, all_ids, "each worker must be expired exactly once");
}

// Listing.

/// One worker of the list fleet: name, role, runtimes and labels.
type FleetMember = (
    &'static str,
    Role,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

/// Registers the workers the list tests filter, at one-second steps from `t0`.
async fn register_list_fleet(store: &dyn Store) -> BTreeMap<&'static str, WorkerRecord> {
    let fleet: [FleetMember; 6] = [
        ("a-py", Role::Sensor, &["python", "shell"], &[("zone", "a")]),
        ("b-node", Role::Sensor, &["node", "shell"], &[("zone", "b")]),
        (
            "c-both",
            Role::Action,
            &["python", "node"],
            &[("zone", "a"), ("tier", "gold")],
        ),
        ("d_x", Role::Hybrid, &[], &[]),
        ("dx-1", Role::Hybrid, &["python3x"], &[("zone", "ab")]),
        ("e-busy", Role::Sensor, &["python"], &[("zone", "a")]),
    ];

    let mut records = BTreeMap::new();
    for (index, (name, role, runtimes, labels)) in fleet.into_iter().enumerate() {
        let registration = registration_with(name, role, runtimes, labels);
        let record = register(store, &registration, &token(1), at(index as i64 * 1000))
            .await
            .unwrap();
        records.insert(name, record);
    }

    let busy = heartbeat(records["e-busy"].id, &token(1), at(5000), Some(Status::Busy));
    store.write_heartbeats(&[busy]).await.unwrap();
    records
}

/// Proves that each list filter alone selects exactly the matching workers.
async fn list_filters_each(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    register_list_fleet(store).await;
    let now = at(10_000);

    let cases: Vec<(&str, ListFilter, Vec<&str>)> = vec![
        (
            "no filter",
            all_workers(),
            vec!["a-py", "b-node", "c-both", "d_x", "dx-1", "e-busy"],
        ),
        (
            "role sensor",
            ListFilter {
                role: Some(Role::Sensor),
                ..all_workers()
            },
            vec!["a-py", "b-node", "e-busy"],
        ),
        (
            "status busy",
            ListFilter {
                statuses: vec![Status::Busy],
                ..all_workers()
            },
            vec!["e-busy"],
        ),
        (
            "statuses active and busy",
            ListFilter {
                statuses: vec![Status::Active, Status::Busy],
                ..all_workers()
            },
            vec!["a-py", "b-node", "c-both", "d_x", "dx-1", "e-busy"],
        ),
        (
            "status inactive",
            ListFilter {
                statuses: vec![Status::Inactive],
                ..all_workers()
            },
            vec![],
        ),
        (
            "runtime python",
            ListFilter {
                runtimes: vec!["python".into()],
                ..all_workers()
            },
            vec!["a-py", "c-both", "e-busy"],
        ),
        (
            "runtimes python and node",
            ListFilter {
                runtimes: vec!["node".into(), "python".into()],
                ..all_workers()
            },
            vec!["c-both"],
        ),
        (
            "runtime prefix is no match",
            ListFilter {
                runtimes: vec!["py".into()],
                ..all_workers()
            },
            vec![],
        ),
        (
            "label zone=a",
            ListFilter {
                labels: [("zone".to_string(), "a".to_string())].into(),
                ..all_workers()
            },
            vec!["a-py", "c-both", "e-busy"],
        ),
        (
            "labels zone=a and tier=gold",
            ListFilter {
                labels: [
                    ("zone".to_string(), "a".to_string()),
                    ("tier".to_string(), "gold".to_string()),
                ]
                .into(),
                ..all_workers()
            },
            vec!["c-both"],
        ),
        (
            "heartbeat at most 6 s old",
            ListFilter {
                max_heartbeat_age: Some(Duration::from_secs(6)),
                ..all_workers()
            },
            vec!["dx-1", "e-busy"],
        ),
        (
            "heartbeat at most 6.999 s old",
            ListFilter {
                max_heartbeat_age: Some(Duration::from_millis(6999)),
                ..all_workers()
            },
            vec!["dx-1", "e-busy"],
        ),
        (
            "heartbeat at most 7 s old, bound inclusive",
            ListFilter {
                max_heartbeat_age: Some(Duration::from_secs(7)),
                ..all_workers()
            },
            vec!["d_x", "dx-1", "e-busy"],
        ),
        (
            "name prefix with underscore",
            ListFilter {
                name_prefix: "d_".into(),
                ..all_workers()
            },
            vec!["d_x"],
        ),
        (
            "name prefix d",
            ListFilter {
                name_prefix: "d".into(),
                ..all_workers()
            },
            vec!["d_x", "dx-1"],
        ),
        (
            "name prefix with percent",
            ListFilter {
                name_prefix: "%".into(),
                ..all_workers()
            },
            vec![],
        ),
    ];

    for (case, filter, expected) in cases {
        assert_eq!(names(store, &filter, now).await, expected, "case {case}");
    }
}

/// Proves that a max heartbeat age reaching past every representable time keeps all workers with a heartbeat.
async fn list_huge_heartbeat_age(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    register_list_fleet(store).await;
    fixture
        .execute("INSERT INTO worker (name, worker_role, status) VALUES ('never-seen', 'sensor', 'inactive')")
        .await;
    let everyone = vec!["a-py", "b-node", "c-both", "d_x", "dx-1", "e-busy", "never-seen"];
    assert_eq!(names(store, &all_workers(), at(10_000)).await, everyone);

    // Ages from 10,000 years up to the largest protobuf Duration.
    let ages = [
        Duration::from_secs(10_000 * 365 * 86_400),
        Duration::from_secs(i64::MAX as u64 / 1000),
        Duration::from_secs(i64::MAX as u64),
    ];
    for age in ages {
        let filter = ListFilter {
            max_heartbeat_age: Some(age),
            ..all_workers()
        };
        assert_eq!(
            names(store, &filter, at(10_000)).await,
            vec!["a-py", "b-node", "c-both", "d_x", "dx-1", "e-busy"],
            "max_heartbeat_age {age:?}"
        );
    }
}

/// Proves that list filters combine with AND.
async fn list_filters_combined(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    register_list_fleet(store).await;
    let now = at(10_000);

    let sensors_with_python_in_zone_a = ListFilter {
        role: Some(Role::Sensor),
        runtimes: vec!["python".into()],
        labels: [("zone".to_string(), "a".to_string())].into(),
        ..all_workers()
    };
    assert_eq!(
        names(store, &sensors_with_python_in_zone_a, now).await,
        vec!["a-py", "e-busy"]
    );

    let active_only = ListFilter {
        statuses: vec![Status::Active],
        ..sensors_with_python_in_zone_a.clone()
    };
    assert_eq!(names(store, &active_only, now).await, vec!["a-py"]);

    let recent = ListFilter {
        max_heartbeat_age: Some(Duration::from_secs(5)),
        ..sensors_with_python_in_zone_a.clone()
    };
    assert_eq!(names(store, &recent, now).await, vec!["e-busy"]);

    let prefixed = ListFilter {
        name_prefix: "a".into(),
        ..sensors_with_python_in_zone_a
    };
    assert_eq!(names(store, &prefixed, now).await, vec!["a-py"]);
}

/// Proves that keyset pages return every worker once, in id order, with one look-ahead row.
async fn list_keyset_pages(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let mut all_ids = Vec::new();
    for index in 0..25 {
        let record = register(store, &registration(&format!("w{index:02}"), "i1"), &token(1), t0())
            .await
            .unwrap();
        all_ids.push(record.id);
    }
    let filter = ListFilter {
        page_size: 10,
        ..ListFilter::default()
    };

    let mut seen: Vec<i64> = Vec::new();
    let mut page_lengths = Vec::new();
    let mut after_id = 0;
    // Bounded: 25 workers fit in 3 pages of 10.
    for _ in 0..10 {
        let rows = store.list(&filter, after_id, t0()).await.unwrap();
        page_lengths.push(rows.len());
        let ids: Vec<i64> = rows.iter().map(|worker| worker.id).collect();
        assert!(
            ids.windows(2).all(|pair| pair[0] < pair[1]),
            "page not in id order: {ids:?}"
        );
        assert!(ids.iter().all(|id| *id > after_id), "page repeats ids: {ids:?}");

        let page: Vec<i64> = ids.into_iter().take(filter.page_size).collect();
        seen.extend(&page);
        if rows.len() <= filter.page_size {
            break;
        }
        after_id = *page.last().unwrap();
    }

    assert_eq!(page_lengths, vec![11, 11, 5]);
    assert_eq!(seen, all_ids);
}

/// Proves that timestamps written by a column default compare like those the store writes.
async fn sql_default_timestamps_compare(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    fixture
        .execute("INSERT INTO worker (name, worker_role, status) VALUES ('legacy', 'sensor', 'active')")
        .await;
    fixture
        .execute("UPDATE worker SET last_heartbeat = created, lease_expires = created WHERE name = 'legacy'")
        .await;

    let legacy = store.get_by_name("legacy").await.unwrap().expect("legacy row missing");
    let created = legacy.created;
    assert_eq!(legacy.status, Status::Active);
    assert_eq!(legacy.role, Role::Sensor);
    assert_eq!(legacy.last_heartbeat, Some(created));
    assert_eq!(legacy.updated, created);
    let wall_clock_error = (Utc::now() - created).num_seconds().abs();
    assert!(wall_clock_error < 60, "default created time is {created}, far from now");

    // A store-written worker registered 2 ms after the default-written one.
    let fresh = register(
        store,
        &registration("fresh", "i1"),
        &token(1),
        created + TimeDelta::milliseconds(2),
    )
    .await
    .unwrap();

    let recent = ListFilter {
        max_heartbeat_age: Some(Duration::from_secs(1)),
        ..all_workers()
    };
    let now = created + TimeDelta::milliseconds(1001);
    assert_eq!(names(store, &recent, now).await, vec!["fresh"]);
    let older_window = ListFilter {
        max_heartbeat_age: Some(Duration::from_secs(2)),
        ..all_workers()
    };
    assert_eq!(names(store, &older_window, now).await, vec!["fresh", "legacy"]);

    let before = created - TimeDelta::seconds(1);
    assert_eq!(store.expire(&sweep(before, NO_GRACE, 100)).await.unwrap(), Vec::new());
    let counts = store.count_leases(&sweep(before, NO_GRACE, 100)).await.unwrap();
    assert_eq!(counts, LeaseCounts { live: 2, expirable: 0 });

    let after = created + TimeDelta::seconds(1);
    let expired = store.expire(&sweep(after, NO_GRACE, 100)).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].name, "legacy");
    assert_eq!(expired[0].last_heartbeat, Some(created));
    assert_eq!(get(store, fresh.id).await.status, Status::Active);

    // The lapsed default-written row can be taken over by anyone.
    let taken = register(store, &registration("legacy", "i9"), &token(9), after)
        .await
        .unwrap();
    assert_eq!(taken.id, legacy.id);
    assert_eq!(taken.created, created);
}

// Validation in front of both backends.

/// Proves that validate_register rejects NUL in every free-text field, so no NUL reaches SQL.
#[test]
fn validate_register_rejects_nul() {
    use worker_registry::json::json_to_struct;
    use worker_registry::proto;
    use worker_registry::validation::validate_register;

    let valid = proto::RegisterRequest {
        name: "sensor-1".into(),
        host: "host-1".into(),
        instance_id: "instance-1".into(),
        runtimes: vec![proto::Runtime {
            name: "python".into(),
            version: "3.11".into(),
            path: "/usr/bin/python3".into(),
        }],
        labels: [("zone".to_string(), "a".to_string())].into(),
        capabilities: Some(json_to_struct(json!({"sensor_version": "1.2"}).as_object().unwrap())),
        ..Default::default()
    };
    validate_register(&valid).expect("the base request must be valid");

    let nul_in_capabilities_value = json!({"sensor_version": "1\u{0}2"});
    let nul_in_capabilities_key = json!({"sensor\u{0}version": "1.2"});
    let nul_in_nested_value = json!({"limits": {"names": ["a", "b\u{0}"]}});
    let cases: Vec<(&str, proto::RegisterRequest, &str)> = vec![
        (
            "name",
            proto::RegisterRequest {
                name: "sensor\u{0}1".into(),
                ..valid.clone()
            },
            "name",
        ),
        (
            "host",
            proto::RegisterRequest {
                host: "host\u{0}1".into(),
                ..valid.clone()
            },
            "host",
        ),
        (
            "instance id",
            proto::RegisterRequest {
                instance_id: "instance\u{0}1".into(),
                ..valid.clone()
            },
            "instance_id",
        ),
        (
            "label value",
            proto::RegisterRequest {
                labels: [("zone".to_string(), "a\u{0}".to_string())].into(),
                ..valid.clone()
            },
            "labels[zone]",
        ),
        (
            "label key",
            proto::RegisterRequest {
                labels: [("zo\u{0}ne".to_string(), "a".to_string())].into(),
                ..valid.clone()
            },
            "labels key \"zo\\0ne\"",
        ),
        (
            "runtime version",
            proto::RegisterRequest {
                runtimes: vec![proto::Runtime {
                    version: "3.11\u{0}".into(),
                    ..valid.runtimes[0].clone()
                }],
                ..valid.clone()
            },
            "runtimes[0].version",
        ),
        (
            "runtime path",
            proto::RegisterRequest {
                runtimes: vec![proto::Runtime {
                    path: "/usr/bin/python\u{0}".into(),
                    ..valid.runtimes[0].clone()
                }],
                ..valid.clone()
            },
            "runtimes[0].path",
        ),
        (
            "capabilities value",
            proto::RegisterRequest {
                capabilities: Some(json_to_struct(nul_in_capabilities_value.as_object().unwrap())),
                ..valid.clone()
            },
            "capabilities.sensor_version",
        ),
        (
            "capabilities key",
            proto::RegisterRequest {
                capabilities: Some(json_to_struct(nul_in_capabilities_key.as_object().unwrap())),
                ..valid.clone()
            },
            "capabilities.sensor\\0version",
        ),
        (
            "nested capabilities value",
            proto::RegisterRequest {
                capabilities: Some(json_to_struct(nul_in_nested_value.as_object().unwrap())),
                ..valid.clone()
            },
            "capabilities.limits.names[1]",
        ),
    ];

    for (case, request, field) in cases {
        let error = validate_register(&request).expect_err(case);
        assert_eq!(error.field, field, "case {case}");
    }
}

// PostgreSQL only: schema, migrations, platform queries and outages.

mod postgres_only {
    use std::time::Instant;

    use chrono::{DateTime, Utc};
    use registry_server::store::{self, PoolOptions, StoreError};
    use serde_json::{json, Value as Json};
    use sqlx::postgres::types::PgInterval;
    use sqlx::types::Json as SqlJson;
    use sqlx::{Connection, Executor, PgConnection, Row};
    use worker_registry::domain::{Role, Status};

    use super::support::proxy::{Mode, Proxy};
    use super::support::{open_migrated, postgres_admin_url, Fixture, TestDatabase};
    use super::{at, get, heartbeat, register, registration, registration_with, t0, token};

    /// Number of migration files of the PostgreSQL backend.
    fn migration_file_count() -> i64 {
        let directory = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations/postgres");
        std::fs::read_dir(directory)
            .unwrap_or_else(|e| panic!("failed to read {directory}: {e}"))
            .filter(|entry| {
                let name = entry.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".sql")
            })
            .count() as i64
    }

    /// Counts applied migrations and checks that each one succeeded.
    async fn applied_migrations(pool: &sqlx::PgPool) -> i64 {
        let rows = sqlx::query("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(pool)
            .await
            .expect("failed to read _sqlx_migrations");
        for row in &rows {
            let version: i64 = row.get("version");
            assert!(row.get::<bool, _>("success"), "migration {version} is marked failed");
        }
        rows.len() as i64
    }

    /// Proves that migrating again, and replaying every migration file by hand, changes nothing.
    #[tokio::test]
    async fn migrate_twice_is_harmless() {
        let Some(fixture) = Fixture::postgres("migrate_twice_is_harmless").await else {
            return;
        };
        let store = fixture.store.as_ref();
        let record = register(store, &registration("w1", "i1"), &token(1), t0())
            .await
            .unwrap();

        store.migrate().await.expect("second migrate failed");
        fixture
            .open_replica()
            .await
            .migrate()
            .await
            .expect("migrate from a replica failed");
        assert_eq!(
            applied_migrations(fixture.postgres_pool()).await,
            migration_file_count()
        );

        let directory = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations/postgres");
        let mut files: Vec<_> = std::fs::read_dir(directory)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files {
            let sql = std::fs::read_to_string(&file).unwrap();
            sqlx::raw_sql(&sql)
                .execute(fixture.postgres_pool())
                .await
                .unwrap_or_else(|e| panic!("replaying {} failed: {e}", file.display()));
        }

        assert_eq!(
            get(store, record.id).await,
            record,
            "replaying migrations changed a row"
        );
    }

    /// Proves that four stores migrating one empty database at once apply each migration once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_migrators_apply_once() {
        let Some(admin_url) = postgres_admin_url("concurrent_migrators_apply_once") else {
            return;
        };
        let database = TestDatabase::create(&admin_url).await;

        let mut stores = Vec::new();
        for _ in 0..4 {
            let store = store::open(&database.url, &PoolOptions::default())
                .await
                .expect("failed to open store");
            stores.push(store);
        }
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(stores.len()));
        let tasks: Vec<_> = stores
            .iter()
            .cloned()
            .map(|store| {
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.migrate().await
                })
            })
            .collect();
        for task in tasks {
            task.await
                .expect("migrate task panicked")
                .expect("concurrent migrate failed");
        }

        let pool = sqlx::PgPool::connect(&database.url).await.unwrap();
        assert_eq!(applied_migrations(&pool).await, migration_file_count());
        let record = register(stores[0].as_ref(), &registration("w1", "i1"), &token(1), t0())
            .await
            .expect("register on the migrated schema failed");
        assert_eq!(record.name, "w1");
        pool.close().await;
    }

    /// Proves that the enum types, columns and indexes have the names and values the platform queries.
    #[tokio::test]
    async fn schema_matches_platform() {
        let Some(fixture) = Fixture::postgres("schema_matches_platform").await else {
            return;
        };
        let pool = fixture.postgres_pool();

        let enums = [
            ("worker_type_enum", vec!["local", "remote", "container"]),
            ("worker_role_enum", vec!["action", "sensor", "hybrid"]),
            ("worker_status_enum", vec!["active", "inactive", "busy", "error"]),
        ];
        for (type_name, expected) in enums {
            let labels: Vec<String> = sqlx::query_scalar(
                "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1::regtype ORDER BY enumsortorder",
            )
            .bind(type_name)
            .fetch_all(pool)
            .await
            .unwrap();
            assert_eq!(labels, expected, "labels of {type_name}");
        }

        let columns: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT column_name::text, udt_name::text, is_nullable::text
             FROM information_schema.columns WHERE table_name = 'worker' ORDER BY column_name",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        let expected_columns = [
            ("capabilities", "jsonb", "NO"),
            ("created", "timestamptz", "NO"),
            ("heartbeat_interval_ms", "int8", "NO"),
            ("host", "text", "YES"),
            ("id", "int8", "NO"),
            ("instance_id", "text", "NO"),
            ("last_heartbeat", "timestamptz", "YES"),
            ("lease_expires", "timestamptz", "YES"),
            ("lease_ttl_ms", "int8", "NO"),
            ("meta", "jsonb", "NO"),
            ("name", "text", "NO"),
            ("port", "int4", "YES"),
            ("session_token_hash", "bytea", "YES"),
            ("status", "worker_status_enum", "NO"),
            ("updated", "timestamptz", "NO"),
            ("worker_role", "worker_role_enum", "NO"),
            ("worker_type", "worker_type_enum", "NO"),
        ];
        let expected_columns: Vec<(String, String, String)> = expected_columns
            .iter()
            .map(|(name, udt, nullable)| (name.to_string(), udt.to_string(), nullable.to_string()))
            .collect();
        assert_eq!(columns, expected_columns);

        let indexes: Vec<String> =
            sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE tablename = 'worker' ORDER BY 1")
                .fetch_all(pool)
                .await
                .unwrap();
        for index in [
            "worker_role_idx",
            "worker_role_status_idx",
            "worker_last_heartbeat_idx",
            "worker_status_lease_idx",
            "worker_runtimes_idx",
        ] {
            assert!(
                indexes.contains(&index.to_string()),
                "index {index} missing: {indexes:?}"
            );
        }

        // With sequential scans priced out, a runtime membership query must
        // be able to use the GIN index.
        let mut connection = pool.acquire().await.unwrap();
        connection.execute("SET enable_seqscan = off").await.unwrap();
        for predicate in [
            "capabilities->'runtimes' ? 'python'",
            "capabilities->'runtimes' ?& ARRAY['python', 'shell']",
        ] {
            let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN SELECT id FROM worker WHERE {predicate}"))
                .fetch_all(&mut *connection)
                .await
                .unwrap();
            let plan = plan.join("\n");
            assert!(
                plan.contains("worker_runtimes_idx"),
                "plan for {predicate} skips the index:\n{plan}"
            );
        }
        connection.execute("RESET enable_seqscan").await.unwrap();
    }

    /// Proves that the platform's four SQL queries run verbatim and return the store-written workers.
    #[tokio::test]
    async fn platform_queries_run_verbatim() {
        let Some(fixture) = Fixture::postgres("platform_queries_run_verbatim").await else {
            return;
        };
        let store = fixture.store.as_ref();
        let pool = fixture.postgres_pool();
        let now = Utc::now();

        let workers = [
            ("sensor-py", Role::Sensor, &["python", "shell"][..]),
            ("sensor-node", Role::Sensor, &["node", "shell"][..]),
            ("sensor-py-busy", Role::Sensor, &["python3"][..]),
            ("sensor-py-gone", Role::Sensor, &["python", "native"][..]),
            ("action-py", Role::Action, &["python"][..]),
            ("hybrid-py", Role::Hybrid, &["python"][..]),
        ];
        let mut ids = std::collections::BTreeMap::new();
        for (name, role, runtimes) in workers {
            // The validation crate normalizes names, so python3 is stored as python.
            let runtimes: Vec<String> = runtimes
                .iter()
                .map(|r| worker_registry::domain::normalize_runtime(r))
                .collect();
            let runtimes: Vec<&str> = runtimes.iter().map(String::as_str).collect();
            let registration = registration_with(name, role, &runtimes, &[("zone", "a")]);
            let record = register(store, &registration, &token(1), now).await.unwrap();
            ids.insert(name, record.id);
        }
        let busy = heartbeat(ids["sensor-py-busy"], &token(1), now, Some(Status::Busy));
        store.write_heartbeats(&[busy]).await.unwrap();
        store.deregister(ids["sensor-py-gone"], &token(1), now).await.unwrap();

        let labels: Vec<String> =
            sqlx::query("SELECT enumlabel FROM pg_enum WHERE enumtypid = 'worker_role_enum'::regtype;")
                .fetch_all(pool)
                .await
                .expect("enum label query failed")
                .iter()
                .map(|row| row.get::<String, _>("enumlabel"))
                .collect();
        assert_eq!(labels, vec!["action", "sensor", "hybrid"]);

        // Enum columns arrive in text form, which the unchecked getter reads as String.
        let rows =
            sqlx::query("SELECT id, name, worker_role, status, capabilities FROM worker WHERE worker_role = 'sensor';")
                .fetch_all(pool)
                .await
                .expect("sensor query failed");
        let mut sensors: Vec<(String, String, String)> = rows
            .iter()
            .map(|row| {
                let id: i64 = row.get("id");
                let name: String = row.get("name");
                assert_eq!(Some(&id), ids.get(name.as_str()), "id of {name}");
                let capabilities: SqlJson<Json> = row.get("capabilities");
                assert_eq!(capabilities.0["labels"], json!({"zone": "a"}), "capabilities of {name}");
                let role: String = row.try_get_unchecked("worker_role").unwrap();
                let status: String = row.try_get_unchecked("status").unwrap();
                (name, role, status)
            })
            .collect();
        sensors.sort();
        let expected: Vec<(String, String, String)> = [
            ("sensor-node", "sensor", "active"),
            ("sensor-py", "sensor", "active"),
            ("sensor-py-busy", "sensor", "busy"),
            ("sensor-py-gone", "sensor", "inactive"),
        ]
        .iter()
        .map(|(n, r, s)| (n.to_string(), r.to_string(), s.to_string()))
        .collect();
        assert_eq!(sensors, expected);

        let rows = sqlx::query(
            "SELECT name, capabilities->'runtimes' FROM worker
 WHERE worker_role = 'sensor' AND capabilities->'runtimes' ? 'python';",
        )
        .fetch_all(pool)
        .await
        .expect("python query failed");
        let mut python_sensors: Vec<(String, Json)> = rows
            .iter()
            .map(|row| (row.get::<String, _>(0), row.get::<SqlJson<Json>, _>(1).0))
            .collect();
        python_sensors.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            python_sensors,
            vec![
                ("sensor-py".to_string(), json!(["python", "shell"])),
                ("sensor-py-busy".to_string(), json!(["python"])),
                ("sensor-py-gone".to_string(), json!(["python", "native"])),
            ]
        );

        let rows = sqlx::query(
            "SELECT name, last_heartbeat, NOW() - last_heartbeat AS lag
  FROM worker WHERE worker_role = 'sensor' AND status = 'active';",
        )
        .fetch_all(pool)
        .await
        .expect("lag query failed");
        let mut active: Vec<String> = Vec::new();
        for row in &rows {
            let name: String = row.get("name");
            let last_heartbeat: DateTime<Utc> = row.get("last_heartbeat");
            let lag: PgInterval = row.get("lag");
            let lag_micros = lag.microseconds + i64::from(lag.days) * 86_400_000_000;
            assert_eq!(lag.months, 0, "lag of {name}");
            assert!(
                (-1_000_000..60_000_000).contains(&lag_micros),
                "lag of {name} is {lag_micros} µs after a heartbeat at {last_heartbeat}"
            );
            active.push(name);
        }
        active.sort();
        assert_eq!(active, vec!["sensor-node", "sensor-py"]);
    }

    /// Proves that a batch with two heartbeats of one session writes the later one.
    #[tokio::test]
    async fn heartbeat_duplicates_keep_latest() {
        let Some(fixture) = Fixture::postgres("heartbeat_duplicates_keep_latest").await else {
            return;
        };
        let store = fixture.store.as_ref();
        let record = register(store, &registration("w1", "i1"), &token(1), t0())
            .await
            .unwrap();

        let batch = [
            heartbeat(record.id, &token(1), at(20_000), Some(Status::Busy)),
            heartbeat(record.id, &token(1), at(10_000), Some(Status::Active)),
        ];
        let updated = store.write_heartbeats(&batch).await.unwrap();

        assert_eq!(updated, vec![record.id]);
        let stored = get(store, record.id).await;
        assert_eq!(stored.last_heartbeat, Some(at(20_000)));
        assert_eq!(stored.status, Status::Busy);
    }

    /// Proves that a statement blocked past statement_timeout fails with Unavailable and the store recovers.
    #[tokio::test]
    async fn statement_timeout_is_unavailable() {
        let Some(fixture) = Fixture::postgres("statement_timeout_is_unavailable").await else {
            return;
        };
        let options = PoolOptions {
            statement_timeout: std::time::Duration::from_millis(300),
            ..PoolOptions::default()
        };
        let store = open_migrated(&fixture.url, &options).await;
        let record = register(store.as_ref(), &registration("w1", "i1"), &token(1), t0())
            .await
            .unwrap();

        // A transaction of another client holds the row lock.
        let mut blocker = PgConnection::connect(&fixture.url).await.unwrap();
        let mut transaction = blocker.begin().await.unwrap();
        sqlx::query("SELECT id FROM worker WHERE id = $1 FOR UPDATE")
            .bind(record.id)
            .fetch_one(&mut *transaction)
            .await
            .unwrap();

        let started = Instant::now();
        let error = store.deregister(record.id, &token(1), at(1000)).await.unwrap_err();
        let elapsed = started.elapsed();

        assert!(matches!(error, StoreError::Unavailable(_)), "got {error:?}");
        assert!(elapsed < std::time::Duration::from_secs(3), "took {elapsed:?}");

        transaction.rollback().await.unwrap();
        let deregistered = store.deregister(record.id, &token(1), at(1000)).await.unwrap();
        assert_eq!(deregistered.status, Status::Inactive);
    }

    /// Proves that open fails with a clear, redacted error when nothing accepts connections.
    #[tokio::test]
    async fn open_fails_when_unreachable() {
        let Some(admin_url) = postgres_admin_url("open_fails_when_unreachable") else {
            return;
        };
        let proxy = Proxy::start(upstream_address(&admin_url)).await;
        proxy.set_mode(Mode::Refuse);
        let url = format!("postgresql://postgres:secret-word@{}/test", proxy.address);
        let options = PoolOptions {
            connect_timeout: std::time::Duration::from_secs(1),
            ..PoolOptions::default()
        };

        let started = Instant::now();
        let error = match store::open(&url, &options).await {
            Ok(_) => panic!("open succeeded although the proxy closes every connection"),
            Err(error) => format!("{error:#}"),
        };

        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(error.contains("failed to connect to PostgreSQL"), "error: {error}");
        assert!(!error.contains("secret-word"), "error shows the password: {error}");
    }

    /// Proves that calls during an outage fail with Unavailable within the timeouts and succeed once it ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outage_is_unavailable_and_recovers() {
        let Some(fixture) = Fixture::postgres("outage_is_unavailable_and_recovers").await else {
            return;
        };
        let proxy = Proxy::start(upstream_address(&fixture.url)).await;
        let mut url = url::Url::parse(&fixture.url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(proxy.address.port())).unwrap();
        let options = PoolOptions {
            max_connections: 2,
            connect_timeout: std::time::Duration::from_secs(1),
            statement_timeout: std::time::Duration::from_secs(1),
        };
        let store = store::open(url.as_str(), &options)
            .await
            .expect("open through the proxy failed");
        let record = register(store.as_ref(), &registration("w1", "i1"), &token(1), t0())
            .await
            .unwrap();

        // Connect timeout, statement timeout and the one-second client margin, plus slack.
        let bound = std::time::Duration::from_secs(5);
        for mode in [Mode::Refuse, Mode::Blackhole] {
            proxy.set_mode(mode);
            let results = [
                ("ping", timed(store.ping()).await.map(|_| ())),
                ("get_by_id", timed(store.get_by_id(record.id)).await.map(|_| ())),
                (
                    "write_heartbeats",
                    timed(store.write_heartbeats(&[heartbeat(record.id, &token(1), at(1000), None)]))
                        .await
                        .map(|_| ()),
                ),
                (
                    "register",
                    timed(register(store.as_ref(), &registration("w2", "i2"), &token(2), t0()))
                        .await
                        .map(|_| ()),
                ),
            ];
            for (operation, result) in results {
                let (error, elapsed) = result.expect_err(operation);
                assert!(
                    matches!(error, StoreError::Unavailable(_)),
                    "{operation} in mode {mode:?} returned {error:?}"
                );
                assert!(elapsed < bound, "{operation} in mode {mode:?} took {elapsed:?}");
            }
        }

        proxy.set_mode(Mode::Forward);
        // Bounded: the pool reconnects within a few attempts once the proxy forwards again.
        let mut recovered = false;
        for _ in 0..20 {
            if store.ping().await.is_ok() {
                recovered = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        assert!(recovered, "the store did not recover after the outage");
        assert_eq!(get(store.as_ref(), record.id).await.name, "w1");
    }

    /// Runs a store call and returns its error with the time it took.
    async fn timed<T>(
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, (StoreError, std::time::Duration)> {
        let started = Instant::now();
        call.await.map_err(|error| (error, started.elapsed()))
    }

    /// Returns the loopback socket address of the server in a PostgreSQL URL.
    fn upstream_address(url: &str) -> std::net::SocketAddr {
        let parsed = url::Url::parse(url).expect("invalid PostgreSQL URL");
        let host = parsed.host_str().expect("PostgreSQL URL has no host");
        let host = if host == "localhost" { "127.0.0.1" } else { host };
        let ip: std::net::IpAddr = host
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .unwrap_or_else(|_| panic!("the outage tests need a numeric loopback host, got {host}"));
        std::net::SocketAddr::new(ip, parsed.port().unwrap_or(5432))
    }
}

// Worker index.

/// Proves that the index reads see changed rows, their session hash and every id.
async fn index_changes_reads_changed_rows(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let old = register(store, &registration("old", "i1"), &token(1), at(0))
        .await
        .unwrap();
    let new = register(store, &registration("new", "i2"), &token(2), at(5000))
        .await
        .unwrap();

    let changes = store.index_changes(at(5000)).await.unwrap();
    assert_eq!(changes.total, 2);
    let ids: Vec<i64> = changes.rows.iter().map(|row| row.id).collect();
    assert_eq!(ids, vec![new.id], "only the row updated at or after the time");
    assert_eq!(changes.rows[0].token_hash.as_deref(), Some(token(2).as_slice()));
    assert_eq!(changes.rows[0].status, Status::Active);
    assert_eq!(changes.rows[0].updated, at(5000));
    assert_eq!(changes.rows[0].last_heartbeat, Some(at(5000)));

    let everything = store.index_changes(at(0)).await.unwrap();
    assert_eq!(everything.rows.len(), 2);

    assert_eq!(store.worker_ids().await.unwrap(), vec![old.id, new.id]);

    let rows = store.index_rows(RowSelection::Ids(&[new.id, 999_999])).await.unwrap();
    assert_eq!(rows.len(), 1, "unknown ids are skipped");
    assert_eq!(rows[0].record, new);
    assert_eq!(rows[0].token_hash.as_deref(), Some(token(2).as_slice()));
    assert!(store.index_rows(RowSelection::Ids(&[])).await.unwrap().is_empty());

    let page = |after_id, limit| RowSelection::After { after_id, limit };
    let first = store.index_rows(page(0, 1)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].record, old);
    let rest = store.index_rows(page(old.id, 10)).await.unwrap();
    assert_eq!(rest.iter().map(|row| row.record.id).collect::<Vec<_>>(), vec![new.id]);
}

/// Proves that a worker from the index decodes to what Get would return.
async fn index_entries_match_records(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let fleet = register_list_fleet(store).await;
    let index = WorkerIndex::new();
    index.reload(store).await.unwrap();

    let listed = index_workers(&index, &all_workers(), at(10_000));
    assert_eq!(listed.len(), fleet.len());
    for worker in listed {
        let expected = worker_to_proto(&get(store, worker.id).await);
        assert_eq!(worker, expected, "worker {}", worker.name);
    }
}

/// Proves that a refresh brings in rows changed, added and deleted by
/// someone else, such as another replica or an operator.
async fn index_follows_outside_changes(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let fleet = register_list_fleet(store).await;
    let index = WorkerIndex::new();
    index.reload(store).await.unwrap();

    // Another writer: a new worker, a re-registration with new runtimes,
    // a status change and a deleted row.
    let other = fixture.open_replica().await;
    register(other.as_ref(), &registration("z-new", "i9"), &token(9), at(20_000))
        .await
        .unwrap();
    let moved = registration_with("b-node", Role::Sensor, &["python"], &[("zone", "c")]);
    register(other.as_ref(), &moved, &token(8), at(20_000)).await.unwrap();
    let retired = fleet["a-py"].id;
    store.deregister(retired, &token(1), at(20_000)).await.unwrap();
    fixture.execute("DELETE FROM worker WHERE name = 'd_x'").await;

    let read = index.refresh(store, at(19_000)).await.unwrap();
    assert!(read >= 3, "the refresh read {read} rows");

    let everyone = index_names(&index, &all_workers(), at(20_000));
    assert_eq!(everyone, vec!["a-py", "b-node", "c-both", "dx-1", "e-busy", "z-new"]);

    let python = ListFilter {
        runtimes: vec!["python".into()],
        ..all_workers()
    };
    assert_eq!(
        index_names(&index, &python, at(20_000)),
        vec!["a-py", "b-node", "c-both", "e-busy"],
        "the re-registration's runtimes are in the index"
    );
    let inactive = ListFilter {
        statuses: vec![Status::Inactive],
        ..all_workers()
    };
    assert_eq!(index_names(&index, &inactive, at(20_000)), vec!["a-py"]);

    // Nothing changed since: a second refresh leaves the same picture.
    index.refresh(store, at(21_000)).await.unwrap();
    assert_eq!(index_names(&index, &all_workers(), at(20_000)), everyone);
}

/// Proves that a read which started before a local write does not undo it.
async fn index_keeps_newer_local_writes(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let record = register(store, &registration("w", "i1"), &token(1), at(0))
        .await
        .unwrap();
    let index = WorkerIndex::new();
    index.reload(store).await.unwrap();

    // The database still has the worker active. The index learns of an
    // expiry that this process wrote after the refresh below started reading.
    let mut refresh = std::pin::pin!(index.refresh(store, at(0)));
    assert!(
        futures::poll!(&mut refresh).is_pending(),
        "the refresh waits for the database"
    );
    index.expired(&[record.id], at(1000));
    refresh.await.unwrap();

    let inactive = ListFilter {
        statuses: vec![Status::Inactive],
        ..all_workers()
    };
    assert_eq!(index_names(&index, &inactive, at(1000)), vec!["w"]);
}

/// Proves that a full load reads a table larger than one page completely.
async fn index_loads_in_pages(fixture: &Fixture) {
    let store = fixture.store.as_ref();
    let insert = match store.backend() {
        "postgres" => {
            "INSERT INTO worker (name, worker_role, status) \
             SELECT 'bulk-' || n, 'sensor', 'inactive' FROM generate_series(1, 4100) AS n"
        }
        _ => {
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 4100) \
             INSERT INTO worker (name, worker_role, status) SELECT 'bulk-' || i, 'sensor', 'inactive' FROM n"
        }
    };
    assert_eq!(fixture.execute(insert).await, 4100);

    let index = WorkerIndex::new();
    assert_eq!(index.reload(store).await.unwrap(), 4100);
    assert_eq!(index.len(), 4100);

    fixture.execute("DELETE FROM worker WHERE name = 'bulk-17'").await;
    assert_eq!(index.reload(store).await.unwrap(), 4099);
    assert_eq!(index.len(), 4099, "a deleted row leaves the index at the next load");
}
