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
use registry_server::store::{
    HeartbeatWrite, LeaseCounts, LeaseGrant, Store, StoreError, StoreResult, Sweep, WorkerRecord,
};
use serde_json::json;
use worker_registry::domain::{Role, Status};
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
    heartbeat_renews_lease,
    heartbeat_stale_token_updates_nothing,
    heartbeat_batch_mixed,
    deregister_twice,
    deregister_unknown_and_superseded,
    expire_marks_lapsed_workers,
    expire_respects_exclude_and_limit,
    expire_respects_grace,
    lease_deadline_is_inclusive,
    sub_millisecond_times_agree,
    concurrent_expire_returns_each_once,
    list_filters_each,
    list_filters_combined,
    list_keyset_pages,
    sql_default_timestamps_compare,
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
async fn names(store: &dyn Store, filter: &ListFilter, now: DateTime<Utc>) -> Vec<String> {
    let mut names: Vec<String> = store
        .list(filter, 0, now)
        .await
        .expect("list failed")
        .into_iter()
        .map(|worker| worker.name)
        .collect();
    names.sort();
    names
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

/// Proves that one batch updates exactly its valid heartbeats and keeps the latest of duplicates.
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
            batch.push(heartbeat(record.id, &token(index), at(10_000), None));
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
            "worker {id} kept an older heartbeat of the batch"
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

    let counts = store.count_leases(&excluded).await.unwrap();
    assert_eq!(counts, LeaseCounts { live: 5, expirable: 4 });

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
            "huge heartbeat age",
            ListFilter {
                max_heartbeat_age: Some(Duration::from_secs(u64::MAX / 4)),
                ..all_workers()
            },
            vec!["a-py", "b-node", "c-both", "d_x", "dx-1", "e-busy"],
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
