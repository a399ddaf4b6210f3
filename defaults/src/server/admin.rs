//! The admin HTTP listener: `/metrics` (Prometheus text), `/status` (JSON), `/health/live`
//! and `/health/ready`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Shared;

#[derive(Clone)]
struct AdminState {
    shared: Arc<Shared>,
    prometheus: Option<PrometheusHandle>,
}

/// Serves the admin routes on `listener` until `stop` turns true.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    prometheus: Option<PrometheusHandle>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/health/live", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .with_state(AdminState { shared, prometheus });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "admin listener failed");
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let Some(prometheus) = &state.prometheus else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed in this process\n",
        )
            .into_response();
    };
    super::metrics::refresh(&state.shared.node).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        prometheus.render(),
    )
        .into_response()
}

async fn status(State(state): State<AdminState>) -> Response {
    axum::Json(super::status_json(&state.shared).await).into_response()
}

async fn ready(State(state): State<AdminState>) -> Response {
    match state.shared.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}
