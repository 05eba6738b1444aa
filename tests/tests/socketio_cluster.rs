//! socket.io clients on different instances (PostgreSQL, several instances) reach each
//! other through the server's own log, not through a socket.io adapter; long-polling
//! needs sticky sessions, here the test load balancer's `lb` query parameter.
//!
//! The clients are npm's `socket.io-client` (`tests/socketio/cluster-client.mjs`, run
//! with node; `scripts/install-node-deps.sh` installs the packages).

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use webwaka_e2e::cluster::{Instances, token};
use webwaka_e2e::proxy::Balance;

/// `tests/socketio`, with its packages installed.
fn socketio_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("socketio");
    assert!(
        dir.join("node_modules/socket.io-client").is_dir(),
        "the socket.io packages are not installed: run scripts/install-node-deps.sh"
    );
    dir
}

/// The instance that the load balancer at `proxy` sends `lb` to (asked over a new
/// connection, as the balancer picks per connection).
async fn instance_for(proxy: &str, lb: &str) -> String {
    let client = reqwest::Client::new();
    let health: Value = client
        .get(format!("{proxy}/health?lb={lb}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    health["services"]["storage"]["instance"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_clients_on_two_instances_reach_each_other_over_sticky_polling() {
    let dir = socketio_dir();
    let cluster = Instances::start(2, |config| config.message_rate_limit = 0).await;
    let proxy = cluster.balancer(Balance::Sticky).await;
    let url = proxy.url();
    // Two `lb` keys that the balancer sends to different instances.
    let lb_a = "a-0".to_owned();
    let instance_a = instance_for(&url, &lb_a).await;
    let mut lb_b = None;
    for i in 0..64 {
        let key = format!("b-{i}");
        if instance_for(&url, &key).await != instance_a {
            lb_b = Some(key);
            break;
        }
    }
    let lb_b = lb_b.expect("some key reaches the other instance");
    // The same key always reaches the same instance (what polling needs).
    assert_eq!(instance_for(&url, &lb_a).await, instance_a);

    let count = 20;
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("cluster-client.mjs")
            .current_dir(&dir)
            .env("PROXY_URL", &url)
            .env("TOKEN_A", token("tenant-x", "user-a", &[]))
            .env("LB_A", &lb_a)
            .env("TOKEN_B", token("tenant-x", "user-b", &[]))
            .env("LB_B", &lb_b)
            .env("COUNT", count.to_string())
            .env("ROOM", "shared")
            .output()
            .expect("node runs (scripts/install-node-deps.sh installs it)")
    });
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("the clients finish")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["refused"], Value::Array(vec![]), "{report}");
    assert_eq!(report["transportA"], "polling");
    assert_eq!(
        report["transportB"], "websocket",
        "B upgraded through the balancer"
    );
    let ns = |v: &Value, from: &str, room: bool| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .filter(|m| m["from"] == from && m["room"].is_string() == room)
            .map(|m| m["n"].as_u64().unwrap())
            .collect()
    };
    let expected: Vec<u64> = (0..count).collect();
    // Each way once, in order: A (polling, instance 1) ↔ B (instance 2).
    assert_eq!(ns(&report["atB"], "user-a", false), expected, "{report}");
    assert_eq!(ns(&report["atA"], "user-b", false), expected, "{report}");
    // The room's messages reach the member on the other instance; the sender's own
    // connection gets its acks instead.
    assert_eq!(ns(&report["atB"], "user-a", true), expected, "{report}");
    assert_eq!(report["atA"].as_array().unwrap().len(), count as usize);
    drop(proxy);
    cluster.stop().await;
}
