//! Muster's coordinator: it holds workspaces and run state, serves the HTTP
//! API, and leases runs to runners over mutually authenticated gRPC.
//!
//! [`start`] binds both ports and spawns every task on one tracker, so tests
//! run a whole coordinator in-process on ephemeral ports; [`run`] is what the
//! binary calls.

pub mod api;
pub mod auth;
pub mod bus;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod monitoring;
pub mod redis_bus;
pub mod revocation;
pub mod store;
pub mod tail;
pub mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use muster_common::secret::write_private_file;
use muster_common::token::{self, TokenKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
use store::{NewApiKeyForBootstrap, Store};

/// A started coordinator.
pub struct Coordinator {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// What runners pin with `--ca-cert-hash`.
    pub ca_cert_hash: String,
    pub store: Arc<dyn Store>,
    bus: Arc<dyn bus::Bus>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Coordinator {
    /// Stops accepting work and waits up to `deadline` for tasks to end.
    pub async fn shutdown(self, deadline: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("coordinator tasks did not stop within the shutdown deadline");
        }
    }

    /// Whether the event bus reaches every coordinator (always, without Redis).
    pub fn bus_health(&self) -> tokio::sync::watch::Receiver<bool> {
        self.bus.health()
    }

    /// The token that stops this coordinator.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Creates the first admin of an empty database and writes its API key to
/// `<data-dir>/admin-api-key` (mode 0600). The key is printed nowhere.
///
/// The key is written to `admin-api-key.new` before the database commits it
/// and renamed into place after, so a crash in between leaves the working key
/// on disk, and a data directory reused with a fresh database gets a key that
/// works instead of keeping a stale one.
async fn bootstrap(store: &dyn Store, data_dir: &Path) -> anyhow::Result<()> {
    let key_path = data_dir.join("admin-api-key");
    let pending = data_dir.join("admin-api-key.new");
    let secret = token::generate(TokenKind::ApiKey);
    let admin = NewApiKeyForBootstrap {
        org_name: "default".into(),
        identity_name: "admin".into(),
        key_name: "bootstrap admin".into(),
        prefix: token::display_prefix(&secret),
        token_hash: token::hash(&secret),
    };
    write_private_file(&pending, format!("{secret}\n").as_bytes())
        .with_context(|| format!("writing {}", pending.display()))?;
    if store.bootstrap(admin).await? {
        std::fs::rename(&pending, &key_path)
            .with_context(|| format!("writing {}", key_path.display()))?;
        tracing::info!(path = %key_path.display(), "created the admin identity; its API key is in this file (mode 0600)");
        println!("muster: admin API key written to {}", key_path.display());
    } else {
        // Bootstrapped before: the key written then is the one that works.
        let _ = std::fs::remove_file(&pending);
    }
    Ok(())
}

async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match config.database().map_err(anyhow::Error::msg)? {
        config::Database::Postgres(url) => Arc::new(
            store::postgres::PgStore::connect(url.expose(), config.database_max_connections)
                .await
                .context("connecting to PostgreSQL (--database-url)")?,
        ),
        config::Database::Sqlite(path) => {
            let store = store::sqlite::SqliteStore::open(&path)
                .await
                .with_context(|| format!("opening the embedded database {}", path.display()))?;
            tracing::info!(path = %path.display(), "using the embedded SQLite database (no --database-url given)");
            Arc::new(store)
        }
    })
}

pub async fn start(config: Config) -> anyhow::Result<Coordinator> {
    config.validate().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("--data-dir: cannot create {}", config.data_dir.display()))?;
    let store = open_store(&config).await?;
    bootstrap(&*store, &config.data_dir).await?;

    let ca = Arc::new(tls::load_or_create_ca(&*store, &config.data_dir).await?);
    let revocations = revocation::Revocations::load(&*store)
        .await
        .context("reading the revoked runners")?;
    let server_tls = tls::server_tls(
        &ca,
        &tls::server_names(&config.tls_sans),
        revocations.clone(),
    )?;

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let bus: Arc<dyn bus::Bus> = match &config.redis_url {
        Some(url) => redis_bus::RedisBus::start(url, &tracker, shutdown.clone()).await?,
        None => Arc::new(bus::InProcessBus::default()),
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let dispatcher = dispatch::Dispatcher::new(
        store.clone(),
        bus.clone(),
        config.lease_ttl(),
        config.healthy_poll.unwrap_or(dispatch::FALLBACK_TICK),
        metrics.clone(),
    );
    tracker.spawn(dispatcher.clone().run(shutdown.clone()));
    tracker.spawn(dispatch::expire_leases(
        store.clone(),
        bus.clone(),
        config.lease_ttl(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let revoker = revocation::Revoker {
        store: store.clone(),
        bus: bus.clone(),
        dispatcher: dispatcher.clone(),
        revocations: revocations.clone(),
    };
    tracker.spawn(revoker.clone().refresh_loop(shutdown.clone()));

    // gRPC: our own TLS acceptor feeds tonic authenticated connections.
    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("--grpc-addr: cannot listen on {}", config.grpc_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let (conns_tx, conns_rx) = tokio::sync::mpsc::channel(64);
    tracker.spawn(grpc::accept_loop(
        grpc_listener,
        server_tls,
        conns_tx,
        shutdown.clone(),
    ));
    let service = grpc::RunnerServiceImpl {
        store: store.clone(),
        bus: bus.clone(),
        dispatcher: dispatcher.clone(),
        ca: ca.clone(),
        runner_cert_validity: config.runner_cert_validity(),
        max_artifact_bytes: config.max_artifact_bytes(),
        revocations,
        shutdown: shutdown.clone(),
    };
    let grpc_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(grpc::AuthorizeLayer)
        .add_service(service.into_server());
    let grpc_shutdown = shutdown.clone();
    tracker.spawn(async move {
        let incoming = tokio_stream::wrappers::ReceiverStream::new(conns_rx);
        if let Err(error) = grpc_server
            .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled())
            .await
        {
            tracing::error!(%error, "grpc server failed");
        }
    });

    let http_listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("--http-addr: cannot listen on {}", config.http_addr))?;
    let http_addr = http_listener.local_addr()?;
    let monitoring = monitoring::start(
        store.clone(),
        config.monitoring(),
        metrics.clone(),
        &tracker,
        shutdown.clone(),
    )?;
    let app = api::router(api::AppState {
        store: store.clone(),
        bus: bus.clone(),
        ca: ca.clone(),
        revoker,
        max_bundle_bytes: config.max_bundle_bytes(),
        tail_poll: config.healthy_poll.unwrap_or(tail::POLL_EVERY),
        metrics,
    })
    // The monitoring routes' context (crate::monitoring::api).
    .layer(axum::Extension(monitoring));
    let http_shutdown = shutdown.clone();
    tracker.spawn(async move {
        let serve = axum::serve(http_listener, app)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await });
        if let Err(error) = serve.await {
            tracing::error!(%error, "http server failed");
        }
    });

    tracing::info!(%http_addr, %grpc_addr, ca_cert_hash = %ca.hash(), "coordinator started");
    Ok(Coordinator {
        http_addr,
        grpc_addr,
        ca_cert_hash: ca.hash(),
        store,
        bus,
        tracker,
        shutdown,
    })
}

/// Serves until `shutdown` fires, then drains for up to 10 s.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let coordinator = start(config).await?;
    println!(
        "muster-coordinator: API on http://{}, runners on https://{} (ca-cert-hash {})",
        coordinator.http_addr, coordinator.grpc_addr, coordinator.ca_cert_hash
    );
    shutdown.cancelled().await;
    coordinator.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
