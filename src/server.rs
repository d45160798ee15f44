//! Running the sidecar: the gRPC server (Limiter, health, reflection) and the admin HTTP server
//! (/metrics, /livez, /readyz), with a graceful shutdown.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::api::LimiterApi;
use crate::config::{Settings, StoreSettings, TierSource};
use crate::limiter::Limiter;
use crate::pb;
use crate::shared_policy::{PolicyGuard, SharedPolicy};
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::{Store, StoreError};

/// How often the gRPC health status follows the store.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("admin server failed: {0}")]
    Admin(#[from] std::io::Error),
}

/// Builds the configured store.
pub fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match &settings.store {
        StoreSettings::Memory { .. } => Arc::new(MemoryStore::new(settings.windows)),
        StoreSettings::Redis { options, .. } => Arc::new(RedisStore::new(options.clone())?),
    })
}

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    store: Arc<dyn Store>,
    stopping: Arc<AtomicBool>,
}

async fn metrics_page(State(s): State<AdminState>) -> String {
    s.metrics.render()
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    if s.stopping.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    match s.store.ping().await {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// Serves until `shutdown` resolves, then reports NOT_SERVING, stops accepting, and lets
/// in-flight calls finish for up to `server.shutdown_grace`.
pub async fn run(
    settings: Settings,
    grpc: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let metrics = crate::metrics::install();
    // Every call goes through the guard, which refuses while this sidecar's shared policy
    // differs from the store's.
    let store: Arc<dyn Store> = Arc::new(PolicyGuard::new(open_store(&settings)?, SharedPolicy::of(&settings)));
    if let StoreSettings::Memory { generated_key: true, .. } = settings.store {
        tracing::info!("No store.hash_key set: recipients are hashed under a key generated for this process.");
    }
    let target = match &settings.store {
        StoreSettings::Memory { .. } => "this process".to_string(),
        StoreSettings::Redis { options, .. } => options.topology.to_string(),
    };
    let ready = match store.ping().await {
        Ok(()) => {
            tracing::info!(backend = store.backend(), store = %target, "Store answers and shares this sidecar's policy.");
            true
        }
        // The guard has logged the differences; the sidecar stays up so /readyz can say why.
        Err(StoreError::Refused(_)) => false,
        Err(e) => {
            tracing::warn!(
                backend = store.backend(),
                store = %target,
                error = %e,
                "Store does not answer yet; serving anyway and retrying on every call."
            );
            false
        }
    };
    let limiter = Arc::new(Limiter::new(&settings, store.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    if ready {
        health.set_serving::<pb::limiter_server::LimiterServer<LimiterApi>>().await;
    } else {
        health.set_not_serving::<pb::limiter_server::LimiterServer<LimiterApi>>().await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled descriptor set is valid");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let stopping = Arc::new(AtomicBool::new(false));

    let grpc_addr = grpc.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let grpc_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(pb::limiter_server::LimiterServer::new(LimiterApi::new(
            limiter.clone(),
            settings.server.sender_token.clone(),
            settings.server.admin_token.clone(),
        )))
        // TCP_NODELAY on every accepted connection (tonic logs a failure and serves anyway):
        // with Nagle's algorithm, a response written while the previous one is unacknowledged
        // waits for the client's delayed ACK, up to 40 ms.
        .serve_with_incoming_shutdown(TcpIncoming::from(grpc).with_nodelay(Some(true)), stopped(stop_rx.clone()));
    let router = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics: metrics.clone(), store: store.clone(), stopping: stopping.clone() })
        .merge(crate::webhooks::router(limiter.clone(), settings.webhooks.clone(), settings.wabas.clone()));
    if settings.webhooks.is_some() {
        tracing::info!(path = crate::webhooks::PATH, "Receiving Meta webhooks on the admin server.");
    }
    // TCP_NODELAY on the admin server's connections too, for the same reason.
    let admin = admin.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "Cannot set TCP_NODELAY on an admin connection; serving it anyway.");
        }
    });
    let admin_server = axum::serve(admin, router).with_graceful_shutdown(stopped(stop_rx.clone()));
    let mut servers = std::pin::pin!(async {
        tokio::try_join!(async { grpc_server.await.map_err(RunError::from) }, async {
            admin_server.await.map_err(RunError::from)
        })
    });

    // The Limiter's gRPC health follows the store, so gRPC readiness probes see an outage.
    let watch_health = health.clone();
    let watch_store = store.clone();
    let mut watch_stop = stop_rx.clone();
    tokio::spawn(async move {
        let mut serving = ready;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
                _ = watch_stop.wait_for(|s| *s) => return,
            }
            metrics.run_upkeep();
            let pinged = watch_store.ping().await;
            let ok = pinged.is_ok();
            if ok != serving {
                serving = ok;
                if ok {
                    tracing::info!("Store answers again; serving.");
                    watch_health.set_serving::<pb::limiter_server::LimiterServer<LimiterApi>>().await;
                } else {
                    let error = pinged.err().map(|e| e.to_string()).unwrap_or_default();
                    tracing::warn!(%error, "Cannot use the store; gRPC health reports NOT_SERVING.");
                    watch_health.set_not_serving::<pb::limiter_server::LimiterServer<LimiterApi>>().await;
                }
            }
        }
    });

    if settings.tier_source == TierSource::Simulate {
        let (limiter, every, mut stop) = (limiter.clone(), settings.simulate_interval, stop_rx.clone());
        tracing::info!(every = ?every, "Simulating tier changes (policy.tier_source = \"simulate\").");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                limiter.simulate_seen().await;
            }
        });
    }

    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, backend = store.backend(), "tiergate serving.");
    tokio::select! {
        // The servers only end on their own when one of them fails.
        result = &mut servers => {
            tracing::error!("A server stopped before shutdown was asked for.");
            let _ = stop_tx.send(true);
            result?;
            return Ok(());
        }
        () = shutdown => {}
    }

    tracing::info!(grace = ?settings.server.shutdown_grace, "Shutting down: NOT_SERVING, draining in-flight calls.");
    stopping.store(true, Ordering::Relaxed);
    health.set_not_serving::<pb::limiter_server::LimiterServer<LimiterApi>>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    let _ = stop_tx.send(true);
    match tokio::time::timeout(settings.server.shutdown_grace, servers).await {
        Ok(result) => {
            result?;
            tracing::info!("Stopped.");
        }
        Err(_) => tracing::warn!("In-flight calls did not finish within shutdown_grace; stopping anyway."),
    }
    Ok(())
}
