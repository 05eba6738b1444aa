//! `GET /health` (real checks of each part) and `GET /metrics` (Prometheus text). No
//! token needed for either.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use webwaka_realtime::protocol::{Health, HealthServices, HealthState, JsonObject, ServiceHealth};

use crate::app::App;
use crate::metrics::label;

fn service(
    status: HealthState,
    message: Option<String>,
    metrics: serde_json::Value,
) -> ServiceHealth {
    ServiceHealth {
        status,
        message,
        metrics: match metrics {
            serde_json::Value::Object(map) => map,
            _ => JsonObject::new(),
        },
    }
}

/// `GET /health`: 200 when healthy or degraded, 503 when unhealthy.
pub(crate) async fn health(State(app): State<Arc<App>>) -> Response {
    // Storage: a write can be committed, a read answers.
    let engine = app.store.engine().name();
    let writer_ok = matches!(
        tokio::time::timeout(Duration::from_secs(2), app.store.ping()).await,
        Ok(Ok(()))
    );
    let figures = match tokio::time::timeout(Duration::from_secs(2), app.store.figures()).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 2 s".to_owned()),
    };
    let pool = app
        .store
        .pool_status()
        .map(|(size, idle, waiting)| json!({"size": size, "idle": idle, "waiting": waiting}));
    let storage = match (&figures, writer_ok) {
        (Ok(f), true) => service(
            HealthState::Healthy,
            None,
            json!({"engine": engine, "databaseBytes": f.database_bytes, "instance": &*app.instance, "pool": pool}),
        ),
        (Ok(_), false) => service(
            HealthState::Unhealthy,
            Some("the database does not take writes".into()),
            json!({"engine": engine, "instance": &*app.instance}),
        ),
        (Err(error), _) => service(
            HealthState::Unhealthy,
            Some(format!("reads fail: {error}")),
            json!({"engine": engine, "instance": &*app.instance}),
        ),
    };
    let active = app.slots.load(Ordering::Relaxed);
    let max = app.config.max_connections;
    let limits = app.connections.limits();
    let http_open = app.connections.open();
    let http_max = limits.http_max_connections;
    let connections = json!({
        "activeConnections": active,
        "maxConnections": max,
        "httpConnections": http_open,
        "maxHttpConnections": http_max,
        "descriptorLimit": limits.descriptor_limit,
        "transports": app.hub.connections_by_transport(),
    });
    let websocket = if app.shutdown.is_cancelled() {
        service(
            HealthState::Unhealthy,
            Some("shutting down".into()),
            connections,
        )
    } else if active.saturating_mul(10) >= max.saturating_mul(9) {
        service(
            HealthState::Degraded,
            Some("90% of WS_MAX_CONNECTIONS in use".into()),
            connections,
        )
    } else if http_open.saturating_mul(10) >= http_max.saturating_mul(9) {
        service(
            HealthState::Degraded,
            Some("90% of HTTP_MAX_CONNECTIONS in use (new connections are shed past it)".into()),
            connections,
        )
    } else {
        service(HealthState::Healthy, None, connections)
    };
    let (eventbus, reconciliation) = match &figures {
        Ok(f) => (
            service(
                if writer_ok {
                    HealthState::Healthy
                } else {
                    HealthState::Unhealthy
                },
                None,
                json!({"logLength": f.log_length, "consumerGroups": f.consumer_groups, "dlqSize": f.dlq_size}),
            ),
            service(
                if writer_ok {
                    HealthState::Healthy
                } else {
                    HealthState::Unhealthy
                },
                None,
                json!({
                    "entities": f.entities,
                    "requests": app.metrics.reconciliation_requests.get(),
                    "conflicts": app.metrics.reconciliation_conflicts.get(),
                }),
            ),
        ),
        Err(_) => (
            service(
                HealthState::Unhealthy,
                Some("the log cannot be read".into()),
                json!({}),
            ),
            service(
                HealthState::Unhealthy,
                Some("entities cannot be read".into()),
                json!({}),
            ),
        ),
    };
    let status = [&websocket, &eventbus, &reconciliation, &storage]
        .iter()
        .map(|s| s.status)
        .max()
        .unwrap_or(HealthState::Healthy);
    let body = Health {
        status,
        services: HealthServices {
            websocket,
            eventbus,
            reconciliation,
            storage,
        },
        timestamp: chrono::Utc::now(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let code = StatusCode::from_u16(status.http_status()).unwrap_or(StatusCode::OK);
    (code, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus (OpenMetrics) text.
pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Response {
    let figures = async {
        let lag = app.store.lag().await?;
        let figures = app.store.figures().await?;
        Ok::<_, crate::error::StoreError>((lag, figures.dlq_size, figures.log_length))
    };
    match tokio::time::timeout(Duration::from_secs(5), figures).await {
        Err(_) => tracing::warn!("reading figures for /metrics took over 5 s"),
        Ok(Err(error)) => tracing::warn!(%error, "reading figures for /metrics failed"),
        Ok(Ok((lag, dlq, log))) => {
            app.metrics.consumer_lag.clear();
            for (tenant, group, n) in lag {
                let mut labels = label("tenant", &tenant);
                labels.push(("group".to_owned(), group));
                app.metrics.consumer_lag.get_or_create(&labels).set(n);
            }
            app.metrics.dlq_size.set(dlq);
            app.metrics.log_length.set(log);
            if let Some((size, idle, waiting)) = app.store.pool_status() {
                for (state, n) in [("size", size), ("idle", idle), ("waiting", waiting)] {
                    app.metrics
                        .db_pool
                        .get_or_create(&label("state", state))
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
        }
    }
    let mut response = app.metrics.encode().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
