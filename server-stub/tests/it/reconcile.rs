//! PROTOCOL.md §5: reconciliation with core's engine, versions, deltas, snapshots.

use serde_json::{Value, json};
use webwaka_realtime::protocol::StateSnapshot;

use crate::common::TestServer;

fn op(
    id: &str,
    client: &str,
    tenant: &str,
    entity: &str,
    kind: &str,
    payload: Value,
    ts: &str,
    clock: Value,
) -> Value {
    json!({
        "operationId": id, "clientId": client, "tenantId": tenant, "entityType": "task",
        "entityId": entity, "operationType": kind, "payload": payload,
        "timestamp": ts, "vectorClock": clock,
    })
}

fn request(tenant: &str, ops: Vec<Value>, last_known: Option<&str>) -> Value {
    let mut r = json!({
        "requestId": "req-1", "clientId": "c1", "tenantId": tenant,
        "operations": ops, "requestedAt": "2026-01-30T10:20:00Z",
    });
    if let Some(v) = last_known {
        r["lastKnownVersion"] = json!(v);
    }
    r
}

#[tokio::test]
async fn reconcile_applies_resolves_and_reports_deltas() {
    let ts = TestServer::start(|_| {}).await;
    let alice = ts.token("t1", "alice", &[]);
    let path = "/api/reconciliation/reconcile";
    let create = op(
        "o1",
        "c1",
        "t1",
        "task-1",
        "CREATE",
        json!({"title": "Ship", "done": false}),
        "2026-01-30T09:00:00Z",
        json!({"c1": 1}),
    );
    let (status, r) = ts
        .post(
            path,
            Some(&alice),
            request("t1", vec![create.clone()], None),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["currentVersion"], "1");
    assert_eq!(r["resolvedOperations"].as_array().unwrap().len(), 1);
    assert_eq!(
        r["deltaUpdates"][0]["data"],
        json!({"title": "Ship", "done": false})
    );
    // The same request again: same state, nothing new.
    let (_, again) = ts
        .post(path, Some(&alice), request("t1", vec![create], None), &[])
        .await;
    assert_eq!(again["currentVersion"], "1");
    assert_eq!(again["conflicts"], json!([]));
    // Two concurrent updates: last writer wins (later timestamp).
    let u2 = op(
        "o2",
        "c2",
        "t1",
        "task-1",
        "UPDATE",
        json!({"title": "Ship v1"}),
        "2026-01-30T09:05:00Z",
        json!({"c1": 1, "c2": 1}),
    );
    let u3 = op(
        "o3",
        "c3",
        "t1",
        "task-1",
        "UPDATE",
        json!({"done": true}),
        "2026-01-30T09:06:00Z",
        json!({"c1": 1, "c3": 1}),
    );
    let (status, r) = ts
        .post(
            path,
            Some(&alice),
            request("t1", vec![u2, u3], Some("1")),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["conflicts"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(
        r["conflicts"][0]["resolution"]["strategy"],
        "LAST_WRITE_WINS"
    );
    // One entity changed: the counter moves once.
    assert_eq!(r["currentVersion"], "2");
    let deltas = r["deltaUpdates"].as_array().unwrap();
    assert_eq!(deltas.len(), 1);
    assert_eq!(deltas[0]["data"], json!({"title": "Ship", "done": true}));
    // A pure pull after version 2 has nothing; after 1, the entity; without a
    // version, everything.
    let (_, pull) = ts
        .post(path, Some(&alice), request("t1", vec![], Some("2")), &[])
        .await;
    assert_eq!(pull["deltaUpdates"], json!([]));
    let (_, pull) = ts
        .post(path, Some(&alice), request("t1", vec![], Some("1")), &[])
        .await;
    assert_eq!(pull["deltaUpdates"].as_array().unwrap().len(), 1);
    let (_, pull) = ts
        .post(path, Some(&alice), request("t1", vec![], None), &[])
        .await;
    assert_eq!(pull["deltaUpdates"].as_array().unwrap().len(), 1);
    // The snapshot, with a checksum that checks out.
    let (status, snap) = ts
        .get(
            "/api/reconciliation/snapshot/task/task-1",
            Some(&alice),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    let snap: StateSnapshot = serde_json::from_value(snap).unwrap();
    assert!(snap.checksum_is_valid());
    assert_eq!(snap.version, "2");
    assert_eq!(snap.tenant_id, "t1");
    // Delete leaves a tombstone, still 200.
    let del = op(
        "o4",
        "c1",
        "t1",
        "task-1",
        "DELETE",
        Value::Null,
        "2026-01-30T10:00:00Z",
        json!({"c1": 2, "c2": 1, "c3": 1}),
    );
    let (status, _) = ts
        .post(path, Some(&alice), request("t1", vec![del], None), &[])
        .await;
    assert_eq!(status, 200);
    let (status, snap) = ts
        .get(
            "/api/reconciliation/snapshot/task/task-1",
            Some(&alice),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (snap["deleted"].as_bool(), &snap["data"]),
        (Some(true), &Value::Null)
    );
    // Unknown, and another tenant's: NOT_FOUND.
    let (status, body) = ts
        .get("/api/reconciliation/snapshot/task/nope", Some(&alice), &[])
        .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("NOT_FOUND")));
    let other = ts.token("t2", "alice", &[]);
    let (status, _) = ts
        .get(
            "/api/reconciliation/snapshot/task/task-1",
            Some(&other),
            &[],
        )
        .await;
    assert_eq!(status, 404);
    let text = ts
        .http
        .get(ts.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("webwaka_reconciliation_conflicts_total 1"),
        "{text}"
    );
}

#[tokio::test]
async fn reconcile_refuses_bad_input_and_other_tenants_without_changing_state() {
    let ts = TestServer::start(|c| c.reconciliation_max_queue_size = 3).await;
    let alice = ts.token("t1", "alice", &[]);
    let path = "/api/reconciliation/reconcile";
    let good = op(
        "o1",
        "c1",
        "t1",
        "e1",
        "CREATE",
        json!({"a": 1}),
        "2026-01-30T09:00:00Z",
        json!({"c1": 1}),
    );
    let mut no_entity = good.clone();
    no_entity.as_object_mut().unwrap().remove("entityId");
    let cases: Vec<(Value, &str)> = vec![
        (
            request(
                "t1",
                vec![
                    good.clone(),
                    op(
                        "o2",
                        "c1",
                        "t1",
                        " ",
                        "UPDATE",
                        json!({}),
                        "2026-01-30T09:00:00Z",
                        json!({"c1": 2}),
                    ),
                ],
                None,
            ),
            "operations[1].entityId",
        ),
        (
            request(
                "t1",
                vec![op(
                    "o3",
                    "c1",
                    "t1",
                    "e",
                    "UPDATE",
                    json!([1]),
                    "2026-01-30T09:00:00Z",
                    json!({"c1": 1}),
                )],
                None,
            ),
            "operations[0].payload",
        ),
        (
            request(
                "t1",
                vec![op(
                    "o3",
                    "c1",
                    "t1",
                    "e",
                    "UPDATE",
                    json!({}),
                    "2026-01-30T09:00:00Z",
                    json!({"other": 1}),
                )],
                None,
            ),
            "operations[0].vectorClock",
        ),
        (
            request("t1", vec![good.clone()], Some("v1.0")),
            "lastKnownVersion",
        ),
        (request("t1", vec![good.clone(); 4], None), "operations"),
        (
            json!({"requestId": "r", "clientId": "c", "tenantId": "t1", "operations": [], "requestedAt": "yesterday"}),
            "requestedAt",
        ),
        // Required: missing is not the same as empty.
        (
            json!({"requestId": "r", "clientId": "c", "tenantId": "t1", "requestedAt": "2026-01-30T09:00:00Z"}),
            "operations",
        ),
    ];
    for (body, path_expected) in cases {
        let (status, error) = ts.post(path, Some(&alice), body.clone(), &[]).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["code"], "INVALID_REQUEST", "{error}");
        let got = error["details"]["path"].as_str().unwrap_or_default();
        assert!(
            got.starts_with(path_expected),
            "expected {path_expected}, got {error}"
        );
    }
    let (status, error) = ts
        .post(
            path,
            Some(&alice),
            request("t1", vec![no_entity], None),
            &[],
        )
        .await;
    assert_eq!(status, 400, "{error}");
    let mut strategy = request("t1", vec![good.clone()], None);
    strategy["strategy"] = json!("CUSTOM_MERGE");
    let (status, error) = ts.post(path, Some(&alice), strategy, &[]).await;
    assert_eq!(
        (status, error["details"]["path"].as_str()),
        (400, Some("strategy"))
    );
    // Another tenant, in the request or in one operation.
    let (status, error) = ts
        .post(
            path,
            Some(&alice),
            request("t2", vec![good.clone()], None),
            &[],
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("TENANT_VIOLATION"))
    );
    let foreign = op(
        "o9",
        "c1",
        "t2",
        "e9",
        "CREATE",
        json!({"a": 1}),
        "2026-01-30T09:00:00Z",
        json!({"c1": 1}),
    );
    let (status, error) = ts
        .post(
            path,
            Some(&alice),
            request("t1", vec![good, foreign], None),
            &[],
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("TENANT_VIOLATION"))
    );
    assert_eq!(error["details"]["via"], "operations[1].tenantId");
    // Nothing was stored by any of them.
    let (_, pull) = ts
        .post(path, Some(&alice), request("t1", vec![], None), &[])
        .await;
    assert_eq!(pull["deltaUpdates"], json!([]));
    assert_eq!(pull["currentVersion"], "0");
}

#[tokio::test]
async fn counter_types_merge_concurrent_increments() {
    let ts = TestServer::start(|c| c.reconciliation_counter_types = "likes".into()).await;
    let alice = ts.token("t1", "alice", &[]);
    let mk = |id: &str, client: &str, kind: &str, payload: Value, clock: Value| {
        let mut o = op(
            id,
            client,
            "t1",
            "post-1",
            kind,
            payload,
            "2026-01-30T09:00:00Z",
            clock,
        );
        o["entityType"] = json!("likes");
        o
    };
    let ops = vec![
        mk("l0", "c0", "CREATE", json!({"n": 0}), json!({"c0": 1})),
        mk(
            "l1",
            "c1",
            "UPDATE",
            json!({"n": 1}),
            json!({"c0": 1, "c1": 1}),
        ),
        mk(
            "l2",
            "c2",
            "UPDATE",
            json!({"n": 1}),
            json!({"c0": 1, "c2": 1}),
        ),
    ];
    let (status, r) = ts
        .post(
            "/api/reconciliation/reconcile",
            Some(&alice),
            request("t1", ops, None),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let (_, snap) = ts
        .get(
            "/api/reconciliation/snapshot/likes/post-1",
            Some(&alice),
            &[],
        )
        .await;
    assert_eq!(snap["data"]["n"], 2);
}

/// Many clients at once, on one entity and on entities of their own: the engine runs
/// beside the storage's lock, but the result is that of one request after another —
/// every concurrent increment of a counter counts once, and versions are given out
/// once each, in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_apply_as_if_one_after_another() {
    let ts = TestServer::start(|c| {
        c.reconciliation_counter_types = "counter".into();
        c.reconciliation_rate_limit = 0;
    })
    .await;
    let path = "/api/reconciliation/reconcile";
    let counter_op = |client: &str, n: usize| {
        json!({
            "operationId": format!("{client}-{n}"), "clientId": client, "tenantId": "t1",
            "entityType": "counter", "entityId": "hot", "operationType": "UPDATE",
            "payload": {"v": 1}, "timestamp": "2026-01-30T09:00:00Z",
            "vectorClock": {"c-init": 1, client: n + 1},
        })
    };
    let own_op = |client: &str| {
        op(
            &format!("{client}-own"),
            client,
            "t1",
            &format!("task-{client}"),
            "CREATE",
            json!({"title": client}),
            "2026-01-30T09:00:00Z",
            json!({client: 1}),
        )
    };
    let alice = ts.token("t1", "alice", &[]);
    let create = json!({
        "operationId": "create-hot", "clientId": "c-init", "tenantId": "t1",
        "entityType": "counter", "entityId": "hot", "operationType": "CREATE",
        "payload": {"v": 0}, "timestamp": "2026-01-30T08:00:00Z",
        "vectorClock": {"c-init": 1},
    });
    let (status, r) = ts
        .post(path, Some(&alice), request("t1", vec![create], None), &[])
        .await;
    assert_eq!(status, 200, "{r}");
    let mut tasks = Vec::new();
    for c in 0..16 {
        let (http, url, token) = (
            ts.http.clone(),
            ts.url(path),
            ts.token("t1", &format!("u{c}"), &[]),
        );
        let ops = vec![counter_op(&format!("c{c}"), 0), own_op(&format!("c{c}"))];
        let mut body = request("t1", ops, None);
        body["requestId"] = json!(format!("req-{c}"));
        let own = format!("task-c{c}");
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let r: Value = r.json().await.unwrap();
            // The version this request gave its own task.
            r["deltaUpdates"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["entityId"] == own.as_str())
                .map(|d| d["version"].as_str().unwrap().parse::<u64>().unwrap())
                .unwrap()
        }));
    }
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.unwrap());
    }
    let (status, hot) = ts
        .get(
            "/api/reconciliation/snapshot/counter/hot",
            Some(&alice),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{hot}");
    assert_eq!(
        hot["data"]["v"], 16,
        "every concurrent increment once: {hot}"
    );
    // Each request changed two entities, each change a version of its own.
    let (_, all) = ts
        .post(path, Some(&alice), request("t1", vec![], None), &[])
        .await;
    let mut seen: Vec<u64> = all["deltaUpdates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["version"].as_str().unwrap().parse().unwrap())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    // The create, then two changes per request.
    assert_eq!(all["currentVersion"], "33", "{all}");
    assert_eq!(
        seen.len(),
        17,
        "16 tasks and the counter, each at its own version"
    );
    versions.sort_unstable();
    let before = versions.len();
    versions.dedup();
    assert_eq!(
        versions.len(),
        before,
        "a version given out twice: {versions:?}"
    );
    assert!(
        versions.iter().all(|v| (2..=33).contains(v)),
        "{versions:?}"
    );
}
