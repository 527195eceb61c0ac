//! Fixtures of the store contract suite: a migrated store on a fresh SQLite
//! file or a fresh PostgreSQL database, and raw SQL access to the same data.
//!
//! PostgreSQL runs only when `REGISTRY_TEST_POSTGRES_URL` names an admin
//! database such as `postgresql://postgres@127.0.0.1:5432/test`. Each test
//! then creates its own database and drops it when the fixture is dropped,
//! also after a failed assertion.

#![allow(dead_code)]

pub mod proxy;

use std::sync::Arc;
use std::time::Duration;

use registry_server::store::{self, PoolOptions, Store};
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::{Connection, Executor, PgConnection};
use tempfile::TempDir;

/// Environment variable with the admin URL of the test PostgreSQL server.
pub const POSTGRES_URL_VAR: &str = "REGISTRY_TEST_POSTGRES_URL";

/// Time allowed to reach the test PostgreSQL server before a test fails.
const ADMIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Returns the admin URL of the test PostgreSQL server, or `None` after
/// printing why the calling test skips its PostgreSQL variant.
pub fn postgres_admin_url(test: &str) -> Option<String> {
    match std::env::var(POSTGRES_URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipping PostgreSQL variant of {test}: {POSTGRES_URL_VAR} is not set");
            None
        }
    }
}

/// A PostgreSQL database created for one test and dropped with `WITH (FORCE)`
/// when this value is dropped.
pub struct TestDatabase {
    /// Admin URL used to create and drop the database.
    admin_url: String,
    /// Database name, `wr_test_` and a random suffix.
    pub name: String,
    /// URL of the new database.
    pub url: String,
}

impl TestDatabase {
    /// Creates an empty database. Panics when the server cannot be reached,
    /// because a suite asked to run on PostgreSQL must not pass without it.
    pub async fn create(admin_url: &str) -> TestDatabase {
        let name = format!("wr_test_{:016x}", rand::random::<u64>());
        let mut admin = connect_admin(admin_url).await;
        admin
            .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
            .await
            .unwrap_or_else(|e| panic!("failed to create test database {name}: {e}"));
        let _ = admin.close().await;

        let mut url = url::Url::parse(admin_url)
            .unwrap_or_else(|e| panic!("{POSTGRES_URL_VAR} is not a valid URL ({e}): {admin_url}"));
        url.set_path(&name);
        TestDatabase {
            admin_url: admin_url.to_string(),
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs outside any async context, and maybe inside a panicking
        // test, so the cleanup gets its own thread and runtime.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await?;
                admin
                    .execute(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#).as_str())
                    .await?;
                admin.close().await?;
                Ok::<(), anyhow::Error>(())
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("failed to drop test database {}: {e}", self.name),
            Err(_) => eprintln!("failed to drop test database {}: cleanup thread panicked", self.name),
        }
    }
}

/// Connects to the admin database, panicking with the reason on failure.
pub async fn connect_admin(admin_url: &str) -> PgConnection {
    let connect = PgConnection::connect(admin_url);
    match tokio::time::timeout(ADMIN_CONNECT_TIMEOUT, connect).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => panic!(
            "{POSTGRES_URL_VAR} is set but PostgreSQL at {} is unreachable: {e}",
            store::redact_url(admin_url)
        ),
        Err(_) => panic!(
            "{POSTGRES_URL_VAR} is set but PostgreSQL at {} did not respond within {ADMIN_CONNECT_TIMEOUT:?}",
            store::redact_url(admin_url)
        ),
    }
}

/// Raw access to the database behind a store, for writes the store API
/// cannot make and for reading columns it does not return.
pub enum RawPool {
    /// SQLite file pool.
    Sqlite(SqlitePool),
    /// PostgreSQL pool.
    Postgres(PgPool),
}

/// A migrated store on its own database.
pub struct Fixture {
    /// Store under test.
    pub store: Arc<dyn Store>,
    /// URL of the store's database.
    pub url: String,
    /// Raw SQL access to the same database.
    pub raw: RawPool,
    /// Keeps the PostgreSQL database alive; dropped after the pools above.
    database: Option<TestDatabase>,
    /// Keeps the SQLite directory alive; dropped last.
    directory: Option<TempDir>,
}

impl Fixture {
    /// Opens a migrated SQLite store on a file in a new temporary directory.
    pub async fn sqlite() -> Fixture {
        let directory = tempfile::tempdir().expect("failed to create a temporary directory");
        let url = format!("sqlite://{}", directory.path().join("registry.db").display());
        let store = open_migrated(&url, &PoolOptions::default()).await;
        let raw = SqlitePool::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("failed to open {url} for raw SQL: {e}"));

        Fixture {
            store,
            url,
            raw: RawPool::Sqlite(raw),
            database: None,
            directory: Some(directory),
        }
    }

    /// Opens a migrated PostgreSQL store on a new database, or returns
    /// `None` when the PostgreSQL suite is not enabled.
    pub async fn postgres(test: &str) -> Option<Fixture> {
        let admin_url = postgres_admin_url(test)?;
        let database = TestDatabase::create(&admin_url).await;
        let store = open_migrated(&database.url, &PoolOptions::default()).await;
        let raw = PgPool::connect(&database.url)
            .await
            .unwrap_or_else(|e| panic!("failed to open {} for raw SQL: {e}", database.name));

        let fixture = Fixture {
            store,
            url: database.url.clone(),
            raw: RawPool::Postgres(raw),
            database: Some(database),
            directory: None,
        };
        Some(fixture)
    }

    /// Opens a second store on the same database, as another replica would.
    pub async fn open_replica(&self) -> Arc<dyn Store> {
        store::open(&self.url, &PoolOptions::default())
            .await
            .unwrap_or_else(|e| panic!("failed to open a second store on {}: {e:#}", self.url))
    }

    /// Runs one raw SQL statement that both backends accept and returns
    /// the number of rows it changed.
    pub async fn execute(&self, sql: &str) -> u64 {
        let result = match &self.raw {
            RawPool::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(|r| r.rows_affected()),
            RawPool::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(|r| r.rows_affected()),
        };
        result.unwrap_or_else(|e| panic!("raw SQL failed: {e}\n{sql}"))
    }

    /// Returns the PostgreSQL pool; panics on SQLite.
    pub fn postgres_pool(&self) -> &PgPool {
        match &self.raw {
            RawPool::Postgres(pool) => pool,
            RawPool::Sqlite(_) => panic!("this check needs the PostgreSQL backend"),
        }
    }

    /// Returns the name of the PostgreSQL test database; panics on SQLite.
    pub fn database_name(&self) -> &str {
        &self
            .database
            .as_ref()
            .expect("this check needs the PostgreSQL backend")
            .name
    }
}

/// Opens the store at `url` and applies migrations, panicking on failure.
pub async fn open_migrated(url: &str, options: &PoolOptions) -> Arc<dyn Store> {
    let store = store::open(url, options)
        .await
        .unwrap_or_else(|e| panic!("failed to open store at {}: {e:#}", store::redact_url(url)));
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("failed to migrate store at {}: {e}", store::redact_url(url)));
    store
}
