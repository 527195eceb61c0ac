//! Server assembly: store, lease loops, gRPC services, health, reflection
//! and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{info, warn};
use worker_registry::proto::worker_registry_server::WorkerRegistryServer;
use worker_registry::validation::MAX_MESSAGE_BYTES;

use crate::clock::Clock;
use crate::config::Settings;
use crate::index::IndexTiming;
use crate::lease::{LeaseSettings, Leases};
use crate::service::{GrantPolicy, RegistryService};
use crate::store::{self, PoolOptions, Store};

/// Interval of HTTP/2 PING frames to idle clients, so dead peers are noticed.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// Time to wait for a PING acknowledgement before closing the connection.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on accepted sockets, for peers that vanish without a FIN.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// A running server.
pub struct Server {
    /// The bound address; with port 0 in the configuration, the port chosen.
    pub local_addr: SocketAddr,
    /// The lease manager, for tests and benchmarks that read its counters.
    pub leases: Arc<Leases>,
    shutdown: CancellationToken,
    health: HealthReporter,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Opens the store that `settings` names and applies its migrations.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    let options = PoolOptions {
        max_connections: settings.database.max_connections,
        connect_timeout: settings.database.connect_timeout,
        statement_timeout: settings.database.statement_timeout,
    };
    let store = store::open(&settings.database.url, &options).await?;
    store
        .migrate()
        .await
        .map_err(|e| anyhow::anyhow!("failed to apply migrations: {e}"))?;
    Ok(store)
}

impl Server {
    /// Opens the database, applies migrations, binds the listen address and
    /// starts serving in a background task.
    pub async fn start(settings: Settings) -> anyhow::Result<Server> {
        let store = open_store(&settings).await?;
        Self::start_with_store(settings, store).await
    }

    /// Starts serving on an already opened and migrated store.
    pub async fn start_with_store(settings: Settings, store: Arc<dyn Store>) -> anyhow::Result<Server> {
        let registry = &settings.registry;
        let backend = store.backend();

        let lease_settings = LeaseSettings {
            sweep_interval: registry.sweep_interval,
            flush_interval: registry.flush_interval,
            mass_expiry_guard: registry.mass_expiry_guard,
            mass_expiry_threshold: registry.mass_expiry_threshold,
            mass_expiry_min_live: registry.mass_expiry_min_live,
            mass_expiry_rate: registry.mass_expiry_rate,
        };
        let leases = Leases::new(store, Clock::new(), lease_settings);

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<WorkerRegistryServer<RegistryService>>().await;
        watch_availability(&leases, health.clone());

        let shutdown = CancellationToken::new();
        let policy = GrantPolicy {
            default_interval: registry.heartbeat_interval,
            min_interval: registry.min_heartbeat_interval,
            max_interval: registry.max_heartbeat_interval,
            missed_heartbeats: registry.missed_heartbeats,
        };
        let service = RegistryService::new(Arc::clone(&leases), policy, shutdown.clone());
        let registry_service = WorkerRegistryServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(usize::MAX);

        let (reflection_v1, reflection_v1alpha) = if registry.reflection {
            let v1 = reflection_builder().build_v1()?;
            let v1alpha = reflection_builder().build_v1alpha()?;
            (Some(v1), Some(v1alpha))
        } else {
            (None, None)
        };

        let listener = TcpListener::bind(registry.listen)
            .await
            .map_err(|e| anyhow::anyhow!("failed to listen on {} (registry.listen): {e}", registry.listen))?;
        let local_addr = listener.local_addr()?;
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(TCP_KEEPALIVE));

        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .add_service(health_service)
            .add_service(registry_service)
            .add_optional_service(reflection_v1)
            .add_optional_service(reflection_v1alpha);

        // Loading the index before listening lets the first List calls use
        // it. When the database cannot be read now, the refresh loop keeps
        // trying and List reads from the database meanwhile.
        let index = Arc::clone(leases.index());
        let load_started = leases.clock().now();
        let loaded_at = match index.reload(leases.store().as_ref()).await {
            Ok(workers) => {
                info!(workers, "worker index loaded");
                Some(load_started)
            }
            Err(error) => {
                warn!(error = %error, "worker index not loaded; List reads from the database until it is");
                None
            }
        };
        let refresher = tokio::spawn(index.run(
            Arc::clone(leases.store()),
            *leases.clock(),
            IndexTiming {
                refresh_interval: registry.index_refresh_interval,
                flush_interval: registry.flush_interval,
            },
            loaded_at,
            {
                let leases = Arc::clone(&leases);
                move |result| leases.observe(result)
            },
            shutdown.clone(),
        ));
        let flusher = tokio::spawn(Arc::clone(&leases).run_flusher(shutdown.clone()));
        let sweeper = tokio::spawn(Arc::clone(&leases).run_sweeper(shutdown.clone()));

        info!(
            address = %local_addr,
            database = %store::redact_url(&settings.database.url),
            backend,
            reflection = registry.reflection,
            "listening"
        );

        let grace = registry.shutdown_grace;
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let serve = router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
            tokio::pin!(serve);

            let served = tokio::select! {
                result = &mut serve => result,
                _ = stop.cancelled() => {
                    // A client holding an idle connection or a half-sent
                    // HTTP/2 preface must not delay the exit past the grace.
                    match tokio::time::timeout(grace, &mut serve).await {
                        Ok(result) => result,
                        Err(_) => {
                            warn!(grace_ms = grace.as_millis() as u64, "grace period over; closing open connections");
                            Ok(())
                        }
                    }
                }
            };

            stop.cancel();
            let _ = sweeper.await;
            let _ = flusher.await;
            let _ = refresher.await;
            served.map_err(anyhow::Error::from)
        });

        Ok(Server {
            local_addr,
            leases,
            shutdown,
            health,
            task,
        })
    }

    /// Starts a graceful shutdown: health turns NOT_SERVING, heartbeat
    /// streams end with UNAVAILABLE, and open connections get the grace
    /// period to finish.
    pub async fn shutdown(&self) {
        info!("shutting down");
        self.health
            .set_not_serving::<WorkerRegistryServer<RegistryService>>()
            .await;
        self.health.set_service_status("", ServingStatus::NotServing).await;
        self.shutdown.cancel();
    }

    /// Waits until the server task ends, after [`Server::shutdown`] or an error.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(worker_registry::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Mirrors database availability into the health status: NOT_SERVING
/// while the database is unreachable, SERVING once it is back.
fn watch_availability(leases: &Leases, health: HealthReporter) {
    let (sender, mut receiver) = watch::channel(true);
    leases.set_availability_hook(Box::new(move |available| {
        let _ = sender.send(available);
    }));

    tokio::spawn(async move {
        while receiver.changed().await.is_ok() {
            let available = *receiver.borrow_and_update();
            let status = if available {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            health.set_service_status(worker_registry::SERVICE_NAME, status).await;
        }
    });
}
