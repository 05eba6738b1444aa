//! The client over TLS: `https://` and `wss://` through a TLS front (a test CA, the
//! server behind it on loopback), with realtime and with polling; a server whose
//! certificate is not trusted is never talked to; a bad root is refused at open.

// Tests may panic on what they did not expect: that is how they fail.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use webwaka_e2e::harness::{TestServer, client_config, direct, exchange, wait_state};
use webwaka_e2e::tls::TlsFront;
use webwaka_realtime::client::{Client, ClientError, StaticToken};
use webwaka_realtime::machine::ConnectionState;
use webwaka_realtime::store::ItemState;

const WITHIN: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_over_wss_and_over_https_polling() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let front = TlsFront::start(server.addr).await.unwrap();

    // Alice on wss://; Bob's WebSocket path does not exist, so he polls over https://.
    let mut alice_config = client_config(&front.url(), &dir.path().join("alice.db"));
    alice_config.tls_root_certificates = vec![front.ca_pem.clone()];
    let mut bob_config = client_config(&front.url(), &dir.path().join("bob.db"));
    bob_config.tls_root_certificates = vec![front.ca_pem.clone()];
    bob_config.ws_path = "/no-websocket-here".into();
    let alice = Client::open(
        alice_config,
        std::sync::Arc::new(StaticToken(server.token("t1", "alice"))),
    )
    .await
    .unwrap();
    let bob = Client::open(
        bob_config,
        std::sync::Arc::new(StaticToken(server.token("t1", "bob"))),
    )
    .await
    .unwrap();
    assert!(wait_state(&alice, ConnectionState::Realtime, WITHIN).await);
    assert!(wait_state(&bob, ConnectionState::Polling, WITHIN).await);

    exchange((&alice, "alice"), (&bob, "bob"), 5, WITHIN).await;
    alice.shutdown().await;
    bob.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_never_talked_to() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let front = TlsFront::start(server.addr).await.unwrap();
    // The test CA is not among the bundled public roots.
    let config = client_config(&front.url(), &dir.path().join("mallory.db"));
    let client = Client::open(
        config,
        std::sync::Arc::new(StaticToken(server.token("t1", "alice"))),
    )
    .await
    .unwrap();
    let mut states = client.watch_state();
    let connected = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if states.borrow_and_update().is_connected() {
                return;
            }
            if states.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        connected.is_err(),
        "connected through an untrusted certificate"
    );
    // What the app sent meanwhile waits in the outbox, not lost.
    let handle = client.send_message(direct("bob", "later")).await.unwrap();
    let item = client.item(&handle.id).await.unwrap().unwrap();
    assert!(
        matches!(item.state, ItemState::Persisted | ItemState::InFlight),
        "{:?}",
        item.state
    );
    client.shutdown().await;
}

/// A hostile or misconfigured server: a certificate from a CA the client trusts, but
/// for another host. Never talked to; what the app sends waits in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_host_is_never_talked_to() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let front = TlsFront::start_for(server.addr, "api.example.invalid")
        .await
        .unwrap();
    let mut config = client_config(&front.url(), &dir.path().join("alice.db"));
    config.tls_root_certificates = vec![front.ca_pem.clone()];
    let client = Client::open(
        config,
        std::sync::Arc::new(StaticToken(server.token("t1", "alice"))),
    )
    .await
    .unwrap();
    let handle = client.send_message(direct("bob", "later")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !client.connection_state().is_connected(),
        "connected through a certificate for another host: {:?}",
        client.connection_state()
    );
    assert!(client.metrics().await.is_ok(), "the client keeps answering");
    let item = client.item(&handle.id).await.unwrap().unwrap();
    assert!(
        matches!(item.state, ItemState::Persisted | ItemState::InFlight),
        "{:?}",
        item.state
    );
    client.shutdown().await;
}

#[tokio::test]
async fn a_bad_root_certificate_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = client_config("https://127.0.0.1:1", &dir.path().join("x.db"));
    config.tls_root_certificates = vec!["not a certificate".into()];
    let err = Client::open(config, std::sync::Arc::new(StaticToken("t".into())))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidInput { field, .. } if field == "tls_root_certificates[0]"),
        "{err:?}"
    );
    assert!(!dir.path().join("x.db").exists(), "nothing opened");
}
