//! Running the sidecar: the gRPC server (Limiter, health, reflection v1 and v1alpha) and the
//! admin HTTP server (/metrics, /livez, /readyz), with a graceful shutdown: on SIGTERM the admin
//! server stays up, answering /readyz 503, while in-flight gRPC calls finish.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;

use crate::api::edge::Edge;
use crate::api::LimiterApi;
use crate::config::{Settings, StoreSettings, TierSource};
use crate::limiter::{Limiter, StoreWatch};
use crate::pb;
use crate::shared_policy::{PolicyGuard, SharedPolicy};
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::{Store, StoreError};

/// How often the gRPC health of the Limiter asks the store whether it answers.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(200);

/// The longest one health probe waits for the store's answer. With [`HEALTH_INTERVAL`], an
/// outage shows as NOT_SERVING within 450 ms even with no call made; a call that fails with
/// UNAVAILABLE shows it before it answers (see [`LimiterHealth`]).
pub const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// After the gRPC server has drained, the admin server gets what is left of
/// `server.shutdown_grace`, and at least this, to finish the requests it is answering.
pub const ADMIN_CLOSE: Duration = Duration::from_secs(1);

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
        StoreSettings::Memory { .. } => Arc::new(MemoryStore::new(settings.windows).with_state_ttl(settings.state_ttl)),
        StoreSettings::Redis { options, .. } => Arc::new(RedisStore::new(options.clone())?),
    })
}

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    store: Arc<dyn Store>,
    stopping: Arc<AtomicBool>,
    limiter: Arc<Limiter>,
}

async fn metrics_page(State(s): State<AdminState>) -> String {
    crate::metrics::render(&s.metrics, s.limiter.labels())
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

/// The gRPC health of `tiergate.v1.Limiter`, which follows the store: set by the probe every
/// [`HEALTH_INTERVAL`], and to NOT_SERVING by any call whose store call fails with a transient
/// error, before that call answers. One lock orders the two, so the last word is the latest.
struct LimiterHealth {
    reporter: HealthReporter,
    serving: Mutex<bool>,
}

impl LimiterHealth {
    async fn set(&self, serving: bool, why: Option<&StoreError>) {
        let mut current = self.serving.lock().await;
        if *current == serving {
            return;
        }
        *current = serving;
        if serving {
            tracing::info!("Store answers again; serving.");
            self.reporter.set_serving::<pb::limiter_server::LimiterServer<LimiterApi>>().await;
        } else {
            let error = why.map(ToString::to_string).unwrap_or_default();
            tracing::warn!(error, "Cannot use the store; gRPC health reports NOT_SERVING.");
            self.reporter.set_not_serving::<pb::limiter_server::LimiterServer<LimiterApi>>().await;
        }
    }
}

#[async_trait::async_trait]
impl StoreWatch for LimiterHealth {
    async fn unavailable(&self, error: &StoreError) {
        self.set(false, Some(error)).await;
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
    let (health, health_service) = tonic_health::server::health_reporter();
    if ready {
        health.set_serving::<pb::limiter_server::LimiterServer<LimiterApi>>().await;
    } else {
        health.set_not_serving::<pb::limiter_server::LimiterServer<LimiterApi>>().await;
    }
    let limiter_health = Arc::new(LimiterHealth { reporter: health.clone(), serving: Mutex::new(ready) });
    let limiter = Arc::new(Limiter::new(&settings, store.clone()).with_store_watch(limiter_health.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled descriptor set is valid");
    // The same service under its v1alpha name, which grpcurl's older builds, grpcio-reflection,
    // Postman and evans still ask for.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the compiled descriptor set is valid");

    // Stops the gRPC server and the background tasks; the admin server stops on its own signal,
    // once gRPC has drained.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let stopping = Arc::new(AtomicBool::new(false));

    let grpc_addr = grpc.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let max_request = settings.server.max_request_bytes;
    let limiter_server = pb::limiter_server::LimiterServer::new(LimiterApi::new(
        limiter.clone(),
        settings.server.sender_token.clone(),
        settings.server.admin_token.clone(),
    ))
    .max_decoding_message_size(max_request);
    let grpc_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(Edge::new(limiter_server, max_request))
        // TCP_NODELAY on every accepted connection (tonic logs a failure and serves anyway):
        // with Nagle's algorithm, a response written while the previous one is unacknowledged
        // waits for the client's delayed ACK, up to 40 ms.
        .serve_with_incoming_shutdown(TcpIncoming::from(grpc).with_nodelay(Some(true)), stopped(stop_rx.clone()));
    let router = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(AdminState {
            metrics: metrics.clone(),
            store: store.clone(),
            stopping: stopping.clone(),
            limiter: limiter.clone(),
        })
        .merge(crate::webhooks::router(
            limiter.clone(),
            settings.webhooks.clone(),
            settings.wabas.clone(),
            max_request,
        ));
    // The status page, at `/` and `/portfolios/<id>`, guarded like the read RPCs.
    let router = router.merge(crate::status::router(
        limiter.clone(),
        store.clone(),
        settings.server.sender_token.clone(),
        settings.server.admin_token.clone(),
    ));
    if settings.webhooks.is_some() {
        tracing::info!(path = crate::webhooks::PATH, "Receiving Meta webhooks on the admin server.");
    }
    // TCP_NODELAY on the admin server's connections too, for the same reason.
    let admin = admin.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "Cannot set TCP_NODELAY on an admin connection; serving it anyway.");
        }
    });
    let admin_server = axum::serve(admin, router).with_graceful_shutdown(stopped(admin_stop_rx));
    let mut grpc_server = std::pin::pin!(async { grpc_server.await.map_err(RunError::from) });
    // Its own task, so it keeps answering while this one waits for gRPC to drain.
    let mut admin_server = tokio::spawn(async { admin_server.await.map_err(RunError::from) });

    // The Limiter's gRPC health follows the store, so gRPC readiness probes see an outage: a
    // bounded ping every HEALTH_INTERVAL, besides the calls that fail (see LimiterHealth).
    let watch_store = store.clone();
    let mut watch_stop = stop_rx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEALTH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = watch_stop.wait_for(|s| *s) => return,
            }
            metrics.run_upkeep();
            let answer = match tokio::time::timeout(HEALTH_PROBE_TIMEOUT, watch_store.ping()).await {
                Ok(answer) => answer,
                Err(_) => Err(StoreError::Unavailable(format!("no answer to a ping within {HEALTH_PROBE_TIMEOUT:?}"))),
            };
            limiter_health.set(answer.is_ok(), answer.as_ref().err()).await;
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

    // The gauges of the portfolios seen lately follow the store, not only the calls that read it.
    let (refresh, every, mut refresh_stop) = (limiter.clone(), settings.metrics.refresh_interval, stop_rx.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = refresh_stop.wait_for(|s| *s) => return,
            }
            refresh.refresh_metrics().await;
        }
    });

    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, backend = store.backend(), "tiergate serving.");
    tokio::select! {
        // The servers only end on their own when one of them fails.
        result = &mut grpc_server => {
            tracing::error!("The gRPC server stopped before shutdown was asked for.");
            let _ = (stop_tx.send(true), admin_stop_tx.send(true));
            return result;
        }
        result = &mut admin_server => {
            tracing::error!("The admin server stopped before shutdown was asked for.");
            let _ = stop_tx.send(true);
            return joined(result);
        }
        () = shutdown => {}
    }

    // The admin server stays up while gRPC drains, so /readyz answers 503 "shutting down" (and
    // /metrics still answers) rather than refusing connections.
    let grace = settings.server.shutdown_grace;
    let deadline = Instant::now() + grace;
    tracing::info!(grace = ?grace, "Shutting down: NOT_SERVING, draining in-flight calls.");
    stopping.store(true, Ordering::Relaxed);
    health.set_not_serving::<pb::limiter_server::LimiterServer<LimiterApi>>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    let _ = stop_tx.send(true);
    let drained = match tokio::time::timeout(grace, &mut grpc_server).await {
        Ok(result) => Some(result),
        Err(_) => {
            tracing::warn!("In-flight calls did not finish within shutdown_grace; stopping anyway.");
            None
        }
    };
    let _ = admin_stop_tx.send(true);
    let left = deadline.saturating_duration_since(Instant::now()).max(ADMIN_CLOSE);
    let closed = tokio::time::timeout(left, &mut admin_server).await;
    if closed.is_err() {
        admin_server.abort();
        tracing::warn!("Admin requests did not finish in time; stopping anyway.");
    }
    match drained {
        Some(result) => result?,
        None => return Ok(()),
    }
    if let Ok(result) = closed {
        joined(result)?;
        tracing::info!("Stopped.");
    }
    Ok(())
}

/// The result of the admin server's task.
fn joined(result: Result<Result<(), RunError>, tokio::task::JoinError>) -> Result<(), RunError> {
    result.unwrap_or_else(|e| Err(RunError::Admin(std::io::Error::other(e))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_sees_an_outage_within_half_a_second_without_any_call() {
        // A store failing right after a probe answered is seen by the next probe: at most one
        // interval later, once that probe has waited its bound.
        assert!(HEALTH_INTERVAL + HEALTH_PROBE_TIMEOUT <= Duration::from_millis(500));
    }
}
