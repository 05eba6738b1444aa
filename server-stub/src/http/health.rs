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
    // Storage: the writer answers a no-op job, a reader answers a query.
    let writer_ok = matches!(
        tokio::time::timeout(Duration::from_secs(2), app.db.write(|_| Ok(()))).await,
        Ok(Ok(()))
    );
    let figures = app.db.read(|conn| {
        let count =
            |sql: &str| -> Result<i64, rusqlite::Error> { conn.query_row(sql, [], |r| r.get(0)) };
        Ok((
            count("SELECT count(*) FROM events")?,
            count("SELECT count(*) FROM consumer_groups")?,
            count("SELECT count(*) FROM dlq")?,
            count("SELECT count(*) FROM entities")?,
            count("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")?,
        ))
    });
    let storage = match (&figures, writer_ok) {
        (Ok((.., bytes)), true) => {
            service(HealthState::Healthy, None, json!({"databaseBytes": bytes}))
        }
        (Ok(_), false) => service(
            HealthState::Unhealthy,
            Some("the storage writer does not answer".into()),
            json!({}),
        ),
        (Err(error), _) => service(
            HealthState::Unhealthy,
            Some(format!("reads fail: {error}")),
            json!({}),
        ),
    };
    let active = app.slots.load(Ordering::Relaxed);
    let max = app.config.max_connections;
    let websocket = if app.shutdown.is_cancelled() {
        service(
            HealthState::Unhealthy,
            Some("shutting down".into()),
            json!({"activeConnections": active, "maxConnections": max}),
        )
    } else if active.saturating_mul(10) >= max.saturating_mul(9) {
        service(
            HealthState::Degraded,
            Some("90% of WS_MAX_CONNECTIONS in use".into()),
            json!({"activeConnections": active, "maxConnections": max}),
        )
    } else {
        service(
            HealthState::Healthy,
            None,
            json!({"activeConnections": active, "maxConnections": max}),
        )
    };
    let (eventbus, reconciliation) = match &figures {
        Ok((log, groups, dlq, entities, _)) => (
            service(
                if writer_ok {
                    HealthState::Healthy
                } else {
                    HealthState::Unhealthy
                },
                None,
                json!({"logLength": log, "consumerGroups": groups, "dlqSize": dlq}),
            ),
            service(
                if writer_ok {
                    HealthState::Healthy
                } else {
                    HealthState::Unhealthy
                },
                None,
                json!({
                    "entities": entities,
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
    let figures = app.db.read(|conn| {
        let lag = crate::bus::lag(conn)?;
        let dlq: i64 = conn.query_row("SELECT count(*) FROM dlq", [], |r| r.get(0))?;
        let log: i64 = conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
        Ok((lag, dlq, log))
    });
    match figures {
        Ok((lag, dlq, log)) => {
            app.metrics.consumer_lag.clear();
            for (tenant, group, n) in lag {
                let mut labels = label("tenant", &tenant);
                labels.push(("group".to_owned(), group));
                app.metrics.consumer_lag.get_or_create(&labels).set(n);
            }
            app.metrics.dlq_size.set(dlq);
            app.metrics.log_length.set(log);
        }
        Err(error) => tracing::warn!(%error, "reading figures for /metrics failed"),
    }
    let mut response = app.metrics.encode().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
