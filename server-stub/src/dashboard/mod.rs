//! The live dashboard at `/dashboard` (docs/dashboard.md): a page embedded in the
//! binary, and the server-sent events that feed it from the server's own state.
//!
//! - `GET /dashboard`, `/dashboard/app.js`, `/dashboard/app.css`: the page (plain
//!   HTML, CSS and JS, no framework), with a Content-Security-Policy that allows
//!   nothing but this server;
//! - `GET /dashboard/api/session`: who the token is and what the page may show
//!   (roles `admin`, `super_admin`; the same tenancy rules as the admin API);
//! - `GET /dashboard/api/stream?token=&tenant=&justification=`: the live feed (SSE;
//!   `EventSource` cannot send headers, so the token comes in the query): a snapshot
//!   of the live facts every second, the durable facts through the storage interface
//!   every few seconds, and every event and live message as it passes;
//! - `POST /dashboard/api/audit/verify`: the chain's check, and where it breaks.
//!
//! Actions (DLQ replay, chaos switches) go through the ordinary admin API.
//!
//! A super admin may watch another tenant, or every tenant (`tenant=*`), with a
//! justification: audited like any cross-tenant access. Opening the stream is itself
//! an audit record (`dashboard.watch`).

mod watch;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use webwaka_realtime::protocol::{ADMIN_JUSTIFICATION_HEADER, AuditResult};

pub(crate) use watch::{CHART_SAMPLE_EVERY, ChartSample, RemoteConnection, Watch};

use crate::app::App;
use crate::audit::AuditRecord;
use crate::auth::{ROLE_ADMIN, ROLE_SUPER_ADMIN};
use crate::error::ApiError;
use crate::http::extract::{Caller, QueryMap, authenticate, header_str, resolve_tenant};

/// The page.
const INDEX: &str = include_str!("assets/index.html");
/// Its script.
const SCRIPT: &str = include_str!("assets/app.js");
/// Its styles.
const STYLE: &str = include_str!("assets/app.css");

/// Nothing but this server: no CDN, no inline script, no other origin to connect to,
/// no frames, no forms elsewhere.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// A live snapshot's period.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// Durable facts are read every this many snapshots.
const DURABLE_EVERY: u32 = 3;
/// A user who polled within this is shown as connected by polling.
const POLLING_RECENT_MS: i64 = 10_000;
/// Tenants whose durable facts a super admin watching every tenant gets.
const MAX_TENANTS: usize = 20;
/// Audit entries read per tenant for the transactions and the audit tail.
const AUDIT_READ: u32 = 300;
/// Events of the log shown when a page opens (per tenant), before live ones arrive.
const BACKLOG: u64 = 50;
/// Events of the log shown when a page opens, all tenants together (the page keeps
/// 500).
const BACKLOG_TOTAL: usize = 500;
/// Connections and rooms listed per snapshot (the totals count them all): a page
/// cannot show fifty thousand rows a second anyway.
const MAX_ROWS: usize = 1000;

/// The routes, added to the server's router.
pub(crate) fn routes(router: axum::Router<Arc<App>>) -> axum::Router<Arc<App>> {
    use axum::routing::{get, post};
    router
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/app.css", get(style))
        .route("/dashboard/api/session", get(session))
        .route("/dashboard/api/stream", get(stream))
        .route("/dashboard/api/audit/verify", post(verify))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

/// Which tenants a dashboard sees.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// One tenant.
    Tenant(String),
    /// Every tenant (a super admin, justified).
    All,
}

impl Scope {
    fn sees(&self, tenant: &str) -> bool {
        match self {
            Self::Tenant(t) => t == tenant,
            Self::All => true,
        }
    }

    fn filter(&self) -> Option<&str> {
        match self {
            Self::Tenant(t) => Some(t),
            Self::All => None,
        }
    }

    fn name(&self) -> &str {
        self.filter().unwrap_or("*")
    }
}

/// The caller of a dashboard request: an admin of its tenant, or a super admin of
/// any tenant (or all of them) with a justification. Refusals are audited as the API's
/// are.
async fn dashboard_caller(
    app: &App,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(Caller, Scope), ApiError> {
    let query = QueryMap::from_uri(uri)?;
    let identity = authenticate(
        app,
        header_str(headers, header::AUTHORIZATION.as_str()),
        query.get("token"),
        uri.path(),
    )
    .await?;
    if !identity.has_any_role(&[ROLE_ADMIN, ROLE_SUPER_ADMIN]) {
        return Err(ApiError::forbidden(format!(
            "the dashboard needs one of the roles {ROLE_ADMIN}, {ROLE_SUPER_ADMIN}"
        )));
    }
    let named = query.get("tenant").map(str::trim).filter(|t| !t.is_empty());
    let justification = query
        .get("justification")
        .or_else(|| header_str(headers, ADMIN_JUSTIFICATION_HEADER));
    if named != Some("*") {
        let caller = resolve_tenant(
            app,
            identity,
            named,
            "query.tenant",
            justification,
            "dashboard",
        )
        .await?;
        let scope = Scope::Tenant(caller.tenant.clone());
        return Ok((caller, scope));
    }
    if !identity.has_role(ROLE_SUPER_ADMIN) {
        return Err(app
            .tenant_violation(
                &identity.tenant_id,
                &identity.user_id,
                "*",
                "query.tenant",
                "dashboard",
            )
            .await);
    }
    let justification = justification.map(str::trim).filter(|j| !j.is_empty());
    let record = AuditRecord::new(
        &identity.tenant_id,
        &identity.user_id,
        "admin.cross_tenant_access",
        "dashboard",
        if justification.is_some() {
            AuditResult::Success
        } else {
            AuditResult::Failure
        },
    )
    .super_admin(justification)
    .target("*");
    app.audit(record).await?;
    let Some(justification) = justification else {
        return Err(ApiError::forbidden(
            "watching every tenant needs a non-blank justification",
        ));
    };
    Ok((
        Caller {
            tenant: identity.tenant_id.clone(),
            identity,
            justification: Some(justification.to_owned()),
        },
        Scope::All,
    ))
}

/// `GET /dashboard/api/session`: who the page is logged in as.
async fn session(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let (caller, scope) = dashboard_caller(&app, &headers, &uri).await?;
    Ok(Json(json!({
        "tenant": caller.identity.tenant_id,
        "user": caller.user(),
        "roles": caller.identity.roles,
        "scope": scope.name(),
        "instance": &*app.instance,
        "engine": app.store.engine().name(),
        "chaos": app.chaos.is_some(),
    })))
}

/// `POST /dashboard/api/audit/verify`: the whole chain, and the first entry that does
/// not check out.
async fn verify(State(app): State<Arc<App>>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require_role(&[ROLE_ADMIN, ROLE_SUPER_ADMIN])?;
    let check = app.store.audit_verify().await?;
    let mut record = AuditRecord::new(
        &caller.identity.tenant_id,
        caller.user(),
        "audit.verify",
        "audit_log",
        AuditResult::Success,
    )
    .target(&caller.tenant)
    .meta("valid", check.valid)
    .meta("via", "dashboard");
    if caller.justification.is_some() {
        record = record.super_admin(caller.justification.as_deref());
    }
    app.audit(record).await?;
    let (broken_at, problem) = match check.first_bad {
        Some((sequence, problem)) => (Some(sequence), Some(problem)),
        None => (None, None),
    };
    Ok(Json(json!({
        "valid": check.valid,
        "entries": check.entries,
        "brokenAt": broken_at,
        "problem": problem,
    })))
}

/// `GET /dashboard/api/stream`: the live feed.
async fn stream(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (caller, scope) = dashboard_caller(&app, &headers, &uri).await?;
    let mut record = AuditRecord::new(
        &caller.identity.tenant_id,
        caller.user(),
        "dashboard.watch",
        "dashboard",
        AuditResult::Success,
    )
    .target(scope.name());
    if caller.justification.is_some() {
        record = record.super_admin(caller.justification.as_deref());
    }
    app.audit(record).await?;
    let (tx, rx) = mpsc::channel::<Event>(64);
    let watcher = app.watch.subscribe();
    let token = (caller.identity.exp, caller.identity.iat);
    app.background
        .spawn(feed(Arc::clone(&app), scope, token, watcher, tx));
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// Feeds one dashboard until it goes away, the server stops or its token (`exp`,
/// `iat`) expires: at `exp` (with the leeway, as `/ws`), or when the chaos layer
/// expires tokens issued before now (seen at the next snapshot). An expiry is said
/// with an `expired` event before the stream ends.
async fn feed(
    app: Arc<App>,
    scope: Scope,
    (exp, iat): (i64, Option<i64>),
    mut watcher: watch::Watcher,
    tx: mpsc::Sender<Event>,
) {
    let token_end = tokio::time::sleep_until(crate::auth::token_end(exp, &app.config));
    tokio::pin!(token_end);
    let expired = || {
        Event::default()
            .event("expired")
            .data(r#"{"code":"AUTH_EXPIRED"}"#)
    };
    let mut ticker = tokio::time::interval(SNAPSHOT_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u32 = 0;
    let shutdown = app.shutdown.clone();
    // False when the page went away or the server stops (a page that stopped reading
    // must not hold the shutdown up).
    let send = |event: Event| {
        let (tx, shutdown) = (&tx, &shutdown);
        async move {
            tokio::select! {
                sent = tx.send(event) => sent.is_ok(),
                () = shutdown.cancelled() => false,
            }
        }
    };
    // The log's newest events first, so that the tail does not start empty (the page
    // drops those it also gets live: it subscribed before this read).
    let backlog = match backlog(&app, &scope).await {
        Ok(items) => Value::Array(items),
        Err(error) => json!({"error": error.to_string()}),
    };
    if !send(Event::default().event("backlog").data(backlog.to_string())).await {
        return;
    }
    // And the charts' last minutes: the instance's totals, all tenants together, so
    // only for a page that watches every tenant (a tenant's page starts its charts
    // when it opens, from its own totals).
    if scope == Scope::All {
        let history = serde_json::to_string(&app.watch.samples()).unwrap_or_default();
        if !send(Event::default().event("history").data(history)).await {
            return;
        }
    }
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            () = &mut token_end => {
                send(expired()).await;
                break;
            }
            _ = ticker.tick() => {
                if app.chaos.as_ref().is_some_and(|chaos| chaos.token_expired(iat)) {
                    send(expired()).await;
                    break;
                }
                // The other instances' connections, for the next snapshots (the node
                // asks at most every other second, however many pages are open).
                app.node.watching();
                let snapshot = Event::default().event("snapshot").data(snapshot(&app, &scope).to_string());
                if !send(snapshot).await {
                    break;
                }
                ticks = ticks.wrapping_add(1);
                if ticks % DURABLE_EVERY != 1 {
                    continue;
                }
                let durable = match durable(&app, &scope).await {
                    Ok(durable) => durable,
                    Err(error) => json!({"error": error.to_string()}),
                };
                Event::default().event("durable").data(durable.to_string())
            }
            item = watcher.items.recv() => match item {
                Ok(item) if scope.sees(&item.tenant) => Event::default().event("item").data(item.json.clone()),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    Event::default().event("skipped").data(skipped.to_string())
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        };
        if !send(event).await {
            break;
        }
    }
}

/// The live facts now: connections (with their last frames, and users polling
/// lately), rooms with their members' presence, the totals for the charts, the chaos
/// switches.
fn snapshot(app: &App, scope: &Scope) -> Value {
    let frames = app.watch.frames();
    let connections = app.hub.connections(scope.filter());
    let mut connected: BTreeSet<(String, String)> = BTreeSet::new();
    let now = crate::time::now_ms();
    let frame =
        |f: &Option<(i64, String)>| f.as_ref().map(|(at, text)| json!({"at": at, "text": text}));
    // Other instances' own lists (while they answer) replace the presence of the users
    // they list (a list holds at most 200 connections of all tenants: users past it
    // keep their presence row).
    let remote = app.watch.remote_connections();
    let listed: HashSet<(&str, &str, &str)> = remote
        .iter()
        .flat_map(|(i, list)| {
            list.iter()
                .map(move |c| (i.as_str(), c.t.as_str(), c.u.as_str()))
        })
        .collect();
    let mut rows: Vec<Value> = connections
        .iter()
        .filter(|c| {
            !c.instance
                .as_deref()
                .is_some_and(|i| listed.contains(&(i, c.tenant.as_str(), c.user.as_str())))
        })
        .take(MAX_ROWS)
        .map(|c| {
            if c.conn_id.is_some() {
                connected.insert((c.tenant.clone(), c.user.clone()));
            }
            let captured = c.conn_id.and_then(|id| frames.get(&id));
            json!({
                "tenant": c.tenant,
                "user": c.user,
                "connId": c.conn_id,
                "clientId": c.client_id,
                "transport": c.transport,
                "since": c.since_ms,
                "instance": c.instance.as_deref().unwrap_or(&app.instance),
                "lastIn": captured.and_then(|f| frame(&f.last_in)),
                "lastOut": captured.and_then(|f| frame(&f.last_out)),
            })
        })
        .collect();
    for (instance, list) in &remote {
        for c in list.iter().filter(|c| scope.sees(&c.t)) {
            if rows.len() >= MAX_ROWS {
                break;
            }
            rows.push(json!({
                "tenant": c.t,
                "user": c.u,
                "clientId": c.c,
                "transport": c.x,
                "since": c.s,
                "instance": instance,
                "lastIn": frame(&c.i),
                "lastOut": frame(&c.o),
            }));
        }
    }
    for ((tenant, user), at) in app.watch.last_polls() {
        if rows.len() < MAX_ROWS
            && now - at <= POLLING_RECENT_MS
            && scope.sees(&tenant)
            && !connected.contains(&(tenant.clone(), user.clone()))
        {
            rows.push(json!({
                "tenant": tenant,
                "user": user,
                "transport": "polling",
                "since": at,
                "instance": &*app.instance,
            }));
        }
    }
    let all_rooms = app.hub.rooms(scope.filter());
    let room_count = all_rooms.len();
    let rooms: Vec<Value> = all_rooms
        .into_iter()
        .take(MAX_ROWS)
        .map(|r| {
            let members: Vec<Value> = r
                .members
                .into_iter()
                .map(|(user, presence)| match presence {
                    Some(p) => {
                        json!({"user": user, "status": p.status, "lastActive": p.last_active})
                    }
                    None => json!({"user": user, "status": "offline"}),
                })
                .collect();
            json!({"tenant": r.tenant, "room": r.room, "members": members})
        })
        .collect();
    let (messages, polls, errors) = app.watch.totals(scope.filter());
    let local = connections.iter().filter(|c| c.conn_id.is_some()).count();
    let chaos =
        crate::chaos::ChaosControl::of(app.chaos.as_ref(), &app.hub, &app.node).map(|c| c.state());
    json!({
        "at": now,
        "instance": &*app.instance,
        "connections": rows,
        "rooms": rooms,
        "totals": {
            "connections": local,
            "listed": connections.len(),
            "rooms": room_count,
            "messages": messages,
            "polls": polls,
            "errors": errors,
        },
        "chaos": chaos,
    })
}

/// The durable facts, through the storage interface (both engines, every instance):
/// consumer groups (lag, deliveries by state, open leases), the DLQ, Class D transactions with their audit
/// entries, the audit log's newest entries.
async fn durable(app: &App, scope: &Scope) -> Result<Value, ApiError> {
    let lag = app.store.lag().await?;
    let tenants = tenants_of(app, scope, &lag);
    let groups: Vec<Value> = lag
        .iter()
        .filter(|(t, _, _)| scope.sees(t))
        .map(|(tenant, group, lag)| json!({"tenant": tenant, "group": group, "lag": lag}))
        .collect();
    let mut dlq = Vec::new();
    let mut transactions = Vec::new();
    let mut audit = Vec::new();
    let mut deliveries = Vec::new();
    for tenant in &tenants {
        let mut value =
            serde_json::to_value(app.store.deliveries(tenant).await?).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut value {
            map.insert("tenant".into(), json!(tenant));
        }
        deliveries.push(value);
        for entry in app.store.dlq(tenant, None).await? {
            let mut value = serde_json::to_value(&entry).unwrap_or(Value::Null);
            if let Value::Object(map) = &mut value {
                map.insert("tenant".into(), json!(tenant));
            }
            dlq.push(value);
        }
        let entries = app.store.audit_page(tenant, None, AUDIT_READ).await?;
        // Each transaction's timeline: its audit entries, oldest first.
        let mut timelines: Vec<(String, Vec<Value>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for entry in entries.iter().rev() {
            if entry.resource != "transaction" {
                continue;
            }
            let Some(id) = entry.resource_id.clone() else {
                continue;
            };
            let at = *index.entry(id.clone()).or_insert_with(|| {
                timelines.push((id, Vec::new()));
                timelines.len() - 1
            });
            timelines[at]
                .1
                .push(serde_json::to_value(entry).unwrap_or(Value::Null));
        }
        for (id, entries) in timelines.into_iter().rev().take(20) {
            let status = app.store.transaction(tenant, &id).await?;
            transactions.push(json!({
                "tenant": tenant,
                "transactionId": id,
                "status": status.as_ref().map(|s| s.status),
                "reason": status.as_ref().and_then(|s| s.reason.clone()),
                "updated": status.as_ref().map(|s| s.updated_ms),
                "audit": entries,
            }));
        }
        audit.extend(
            entries
                .iter()
                .take(30)
                .map(|e| serde_json::to_value(e).unwrap_or(Value::Null)),
        );
    }
    Ok(json!({
        "groups": groups,
        "deliveries": deliveries,
        "dlq": dlq,
        "transactions": transactions,
        "audit": audit,
    }))
}

/// The tenants whose durable facts a dashboard gets: its own, or (watching every
/// tenant) those with consumer groups, connections or rooms, at most [`MAX_TENANTS`].
fn tenants_of(app: &App, scope: &Scope, lag: &[(String, String, i64)]) -> Vec<String> {
    match scope {
        Scope::Tenant(t) => vec![t.clone()],
        Scope::All => {
            let mut all: BTreeSet<String> = lag.iter().map(|(t, _, _)| t.clone()).collect();
            all.extend(app.hub.connections(None).into_iter().map(|c| c.tenant));
            all.extend(app.hub.rooms(None).into_iter().map(|r| r.tenant));
            all.into_iter().take(MAX_TENANTS).collect()
        }
    }
}

/// The newest [`BACKLOG`] events of each tenant watched, through the storage interface,
/// oldest first, as tail items. How each recipient got them was not captured (no page
/// was open): a direct message names its recipient as sent before the page opened.
async fn backlog(app: &App, scope: &Scope) -> Result<Vec<Value>, ApiError> {
    let lag = match scope {
        Scope::Tenant(_) => Vec::new(),
        Scope::All => app.store.lag().await?,
    };
    // What retention keeps (older events may still be stored until the next purge).
    let cutoff = crate::log::retention_cutoff(app.config.event_bus_retention_period_ms);
    let mut items = Vec::new();
    for tenant in tenants_of(app, scope, &lag) {
        let last = app.store.last_seq(&tenant).await?;
        let stored = app
            .store
            .visible_after(
                &tenant,
                crate::log::Viewer::Everything,
                last.saturating_sub(BACKLOG),
                cutoff,
                u32::try_from(BACKLOG).unwrap_or(u32::MAX),
            )
            .await?;
        items.extend(stored.iter().map(|s| backlog_item(&tenant, s)));
    }
    items.sort_by_key(|item| item["at"].as_i64().unwrap_or(0));
    let excess = items.len().saturating_sub(BACKLOG_TOTAL);
    items.drain(..excess);
    Ok(items)
}

/// A stored event as the tail shows it (sender, room and recipient from its message).
fn backlog_item(tenant: &str, stored: &crate::log::Stored) -> Value {
    let event = serde_json::from_str::<webwaka_realtime::protocol::Event>(&stored.body).ok();
    let message = event
        .as_ref()
        .and_then(|e| e.message())
        .and_then(Result::ok);
    let sender = message
        .as_ref()
        .map(|m| m.sender_id.as_str())
        .or_else(|| event.as_ref().and_then(|e| e.metadata.user_id.as_deref()));
    let room = message.as_ref().and_then(|m| m.room_id.as_deref());
    let recipient = message.as_ref().and_then(|m| m.recipient_id.as_deref());
    let recipients: Vec<Value> = recipient
        .iter()
        .map(|user| json!({"user": user, "delivery": "before this page opened"}))
        .collect();
    watch::EventItem {
        tenant,
        seq: stored.seq,
        event_id: &stored.event_id,
        body: &stored.body,
        at: event.as_ref().map_or(0, |e| e.timestamp.timestamp_millis()),
        sender,
        room,
        recipient,
        everyone: message.is_none() || (room.is_none() && recipient.is_none()),
        recipients,
    }
    .json()
}
