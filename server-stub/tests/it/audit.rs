//! INV-003: the hash-chained audit log, its endpoints and the `verify-audit` command.

use serde_json::json;

use crate::common::{SECRET, TestServer, audit_entries};

#[tokio::test]
async fn the_chain_links_verifies_and_detects_tampering() {
    let mut ts = TestServer::start(|_| {}).await;
    let alice = ts.token("t1", "alice", &[]);
    let admin = ts.token("t1", "root", &["admin"]);
    // Some audited actions.
    ts.get("/api/events/poll", Some(&alice), &[("X-Tenant-ID", "t2")])
        .await;
    ts.post(
        "/api/transactions",
        Some(&alice),
        json!({"transactionType": "pay", "payload": {}}),
        &[("Idempotency-Key", "a")],
    )
    .await;
    let entries = audit_entries(&ts, "t1").await;
    assert!(entries.len() >= 2);
    // Newest first, each linked to the one before.
    for pair in entries.windows(2) {
        assert_eq!(pair[0]["prevHash"], pair[1]["hash"], "{pair:?}");
        assert!(pair[0]["sequence"].as_u64() > pair[1]["sequence"].as_u64());
    }
    // Paging with `before`.
    let newest = entries[0]["sequence"].as_u64().unwrap();
    let (_, page) = ts
        .get(
            &format!("/api/admin/audit?limit=1&before={newest}"),
            Some(&admin),
            &[],
        )
        .await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);
    assert!(page["entries"][0]["sequence"].as_u64().unwrap() < newest);
    let (status, error) = ts.get("/api/admin/audit?limit=0", Some(&admin), &[]).await;
    assert_eq!(
        (status, error["details"]["path"].as_str()),
        (400, Some("limit"))
    );
    let (status, verify) = ts.get("/api/admin/audit/verify", Some(&admin), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(verify["valid"], true);
    assert!(verify["entries"].as_u64().unwrap() >= 3);
    // The command agrees.
    ts.stop().await;
    let bin = env!("CARGO_BIN_EXE_webwaka-server-stub");
    let verify = || {
        let mut command = std::process::Command::new(bin);
        command
            .arg("--data-dir")
            .arg(ts.dir.path())
            .arg("verify-audit")
            .env_remove("DATA_DIR")
            .env_remove("DATABASE_URL");
        if let Some(url) = &ts.config.database_url {
            command.env("DATABASE_URL", url);
        }
        command.output().unwrap()
    };
    let out = verify();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"valid\":true"));
    // Someone edits an entry behind the server's back (dropping the guard first).
    let unguard = match ts.engine() {
        webwaka_server_stub::Engine::Sqlite => "DROP TRIGGER audit_log_no_update",
        webwaka_server_stub::Engine::Postgres => "DROP TRIGGER audit_log_no_change ON audit_log",
    };
    ts.sql(&format!(
        "{unguard}; UPDATE audit_log SET body = replace(body, 'FAILURE', 'SUCCESS') WHERE sequence = 1"
    ))
    .await;
    let out = verify();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"valid\":false"));
    ts.restart().await;
    let admin = ts.token("t1", "root", &["admin"]);
    let (_, verify) = ts.get("/api/admin/audit/verify", Some(&admin), &[]).await;
    assert_eq!(verify["valid"], false);
}

#[tokio::test]
async fn the_token_command_mints_tokens_the_server_accepts() {
    let ts = TestServer::start(|_| {}).await;
    let bin = env!("CARGO_BIN_EXE_webwaka-server-stub");
    let out = std::process::Command::new(bin)
        .args([
            "token",
            "--tenant",
            "demo",
            "--user",
            "alice",
            "--roles",
            "admin,service",
        ])
        .env("JWT_SECRET", SECRET)
        .env("DATA_DIR", ts.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let identity = ts.running().keys().verify(&token).unwrap();
    assert_eq!(identity.tenant_id, "demo");
    assert_eq!(identity.user_id, "alice");
    assert_eq!(
        identity.roles,
        vec!["admin".to_owned(), "service".to_owned()]
    );
    let (status, _) = ts.get("/api/admin/audit", Some(&token), &[]).await;
    assert_eq!(status, 200);
    // Production mode without a secret refuses.
    let out = std::process::Command::new(bin)
        .args(["token", "--tenant", "demo", "--user", "alice"])
        .env_remove("JWT_SECRET")
        .env("WEBWAKA_MODE", "production")
        .env("DATA_DIR", ts.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JWT_SECRET"));
}

#[tokio::test]
async fn dev_mode_generates_and_keeps_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::common::test_config(dir.path());
    config.jwt_secret = None;
    let server = webwaka_server_stub::Server::start(config.clone())
        .await
        .unwrap();
    let token = server.token("t", "u", &[]);
    server.shutdown().await;
    let secret = std::fs::read_to_string(config.dev_secret_path()).unwrap();
    assert!(secret.trim().len() >= 32);
    // The next start keeps it: old tokens stay valid.
    let server = webwaka_server_stub::Server::start(config.clone())
        .await
        .unwrap();
    assert!(server.keys().verify(&token).is_ok());
    server.shutdown().await;
    // Production mode refuses to start without one.
    config.mode = webwaka_server_stub::config::Mode::Production;
    assert!(webwaka_server_stub::Server::start(config).await.is_err());
}
