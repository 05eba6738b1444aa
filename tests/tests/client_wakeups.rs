//! How often an idle client wakes up, in virtual time (`tokio::time::pause`): an hour
//! passes in a moment, and the supervisor's wake-ups (`ClientMetrics::supervisor_wakeups`:
//! every event or deadline its loop handled) are counted. Guards the energy budget of
//! issue 13: idle and connected, heartbeats only; offline in Suspended, almost nothing.
//! The whole-process figures (context switches of every thread) come from the `bench`
//! binary's `wakeups` group, not from here.
//!
//! The server runs in the same (paused) runtime, on a real loopback socket, so that its
//! heartbeat follows the same virtual clock.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use webwaka_e2e::harness::{TestServer, open_client, wait_state};
use webwaka_realtime::client::{Client, ClientConfig};
use webwaka_realtime::machine::ConnectionState;

const HOUR: Duration = Duration::from_secs(3600);

/// Production timings, except a heartbeat every 30 s on both sides.
fn production_config(server_url: &str, store: &std::path::Path) -> ClientConfig {
    let mut config = ClientConfig::new(server_url, store);
    config.machine.ping_interval = Duration::from_secs(30);
    config
}

async fn wakeups(client: &Client) -> u64 {
    client.metrics().await.unwrap().supervisor_wakeups
}

/// Lets virtual time pass in steps (so that the runtime's auto-advance has work to
/// interleave with), returning nothing.
async fn idle_for(total: Duration) {
    let step = Duration::from_secs(60);
    let mut passed = Duration::ZERO;
    while passed < total {
        tokio::time::sleep(step).await;
        passed += step;
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_connected_client_wakes_up_for_heartbeats_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| {
        c.ping_interval_ms = 30_000;
        c.ping_timeout_ms = 120_000;
    })
    .await;
    let client = open_client(
        production_config(&server.url(), &dir.path().join("client.db")),
        server.token("t1", "alice"),
    )
    .await;
    assert!(wait_state(&client, ConnectionState::Realtime, Duration::from_secs(30)).await);
    // The first minutes: the first pulls find nothing and back off.
    idle_for(Duration::from_secs(600)).await;
    let before = wakeups(&client).await;
    idle_for(HOUR).await;
    let per_hour = wakeups(&client).await - before;
    assert_eq!(
        client.connection_state(),
        ConnectionState::Realtime,
        "still connected"
    );
    // The server pings every 30 s (120 an hour, each arriving as activity); the client,
    // hearing them, sends no pings of its own; the backed-off pulls add a few. The old
    // 500 ms tick alone was 7,200 an hour.
    eprintln!("idle and connected: {per_hour} supervisor wake-ups in an hour");
    assert!(
        per_hour <= 500,
        "{per_hour} wake-ups in an idle connected hour (budget 500)"
    );
    assert!(
        per_hour >= 100,
        "{per_hour} wake-ups: the heartbeat did not run (the test measures nothing)"
    );
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_suspended_client_barely_wakes_up() {
    let dir = tempfile::tempdir().unwrap();
    // A server that mints the token, then stops: its loopback port refuses every
    // attempt at once.
    let mut server = TestServer::start(dir.path()).await;
    let token = server.token("t1", "alice");
    server.stop().await;
    let client = open_client(
        production_config(&server.url(), &dir.path().join("client.db")),
        token,
    )
    .await;
    // Offline for `suspend_after` (5 min), then Suspended.
    let suspended = wait_state(
        &client,
        ConnectionState::Suspended,
        Duration::from_secs(900),
    )
    .await;
    assert!(
        suspended,
        "not Suspended but {:?}: {:?}",
        client.connection_state(),
        client.metrics().await
    );
    let before = wakeups(&client).await;
    idle_for(HOUR).await;
    let per_hour = wakeups(&client).await - before;
    assert_eq!(client.connection_state(), ConnectionState::Suspended);
    eprintln!("offline, Suspended: {per_hour} supervisor wake-ups in an hour");
    assert!(
        per_hour <= 100,
        "{per_hour} wake-ups in a Suspended hour (budget 100)"
    );
    assert!(
        per_hour >= 10,
        "{per_hour} wake-ups: no retries at all (the test measures nothing)"
    );
    client.shutdown().await;
}

/// In the background the client does only what the app asks: after the linger it
/// closes its connection and sleeps through the server's pings, the pulls and the
/// retries (none of them reach it); a send from the background connects, delivers and
/// parks again; back in front, it is connected at once.
#[tokio::test(start_paused = true)]
async fn a_backgrounded_client_wakes_up_only_for_what_the_app_asks() {
    use webwaka_e2e::harness::direct;
    use webwaka_realtime::store::ItemState;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| {
        c.ping_interval_ms = 30_000;
        c.ping_timeout_ms = 120_000;
    })
    .await;
    let client = open_client(
        production_config(&server.url(), &dir.path().join("client.db")),
        server.token("t1", "alice"),
    )
    .await;
    assert!(wait_state(&client, ConnectionState::Realtime, Duration::from_secs(30)).await);
    client.background();
    idle_for(Duration::from_secs(60)).await; // past the 10 s linger
    assert_eq!(client.connection_state(), ConnectionState::Offline);
    let before = wakeups(&client).await;
    idle_for(HOUR).await;
    // Less the one that answered this very reading (`metrics()` is a command).
    let per_hour = wakeups(&client).await - before - 1;
    eprintln!("backgrounded: {per_hour} supervisor wake-ups in an hour");
    assert_eq!(
        per_hour, 0,
        "the app asked for nothing, yet the client woke {per_hour} times"
    );
    assert_eq!(client.connection_state(), ConnectionState::Offline);

    // A send from the background (a reply from a notification): delivered, then parked.
    let before = wakeups(&client).await;
    let item = client
        .send_message(direct("bob", "from the background"))
        .await
        .unwrap();
    let settled = client
        .wait_settled(&item.id, &[ItemState::Accepted], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(settled.state, ItemState::Accepted);
    idle_for(Duration::from_secs(60)).await;
    assert_eq!(
        client.connection_state(),
        ConnectionState::Offline,
        "parked again"
    );
    idle_for(HOUR).await;
    let for_the_send = wakeups(&client).await - before;
    eprintln!("one send from the background: {for_the_send} wake-ups in the next hour");
    assert!(
        (1..=40).contains(&for_the_send),
        "{for_the_send} wake-ups for one send in the background"
    );

    client.foreground();
    assert!(wait_state(&client, ConnectionState::Realtime, Duration::from_secs(5)).await);
    client.shutdown().await;
}
