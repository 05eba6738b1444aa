//! Helpers for the tests of this crate and of the end-to-end crate: which engine the
//! run exercises, a fresh database per test, and raw SQL on either engine (to look at
//! or tamper with what the server stored).
//!
//! The engine comes from `WEBWAKA_TEST_DATABASE` (`sqlite`, the default, or `postgres`).
//! With `postgres`, `WEBWAKA_TEST_PG_URL` names a cluster's admin URL
//! (`scripts/pg-cluster.sh` starts one; `scripts/test-all.sh` does it for every run) and
//! each test gets a database of its own. A run asked for PostgreSQL that cannot get its
//! database fails: it never falls back to SQLite.

use crate::config::Config;
use crate::store::Engine;

/// The variable naming the engine a test run exercises.
pub const DATABASE_ENV: &str = "WEBWAKA_TEST_DATABASE";
/// The variable naming the PostgreSQL cluster's admin URL.
pub const ADMIN_URL_ENV: &str = "WEBWAKA_TEST_PG_URL";

/// The engine this test run exercises.
pub fn engine_under_test() -> Engine {
    match std::env::var(DATABASE_ENV).as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => Engine::Sqlite,
        Ok("postgres") => Engine::Postgres,
        Ok(other) => panic!("{DATABASE_ENV}={other:?}: expected sqlite or postgres"),
    }
}

/// The cluster's admin URL; panics when a PostgreSQL run has none.
pub fn admin_url() -> String {
    std::env::var(ADMIN_URL_ENV).unwrap_or_else(|_| {
        panic!(
            "{DATABASE_ENV}=postgres needs {ADMIN_URL_ENV} (start a cluster with \
             scripts/pg-cluster.sh, or run scripts/test-all.sh)"
        )
    })
}

/// Creates an empty database on the cluster at `admin_url` and returns its URL.
pub async fn fresh_database(admin_url: &str) -> Result<String, String> {
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot reach the test cluster at {admin_url}: {e}"))?;
    let driver = tokio::spawn(connection);
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let created = client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(|e| format!("CREATE DATABASE {name}: {e}"));
    drop(client);
    let _ = driver.await;
    created?;
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url, |(base, _)| base);
    Ok(format!("{base}/{name}"))
}

/// Points `config` at the engine under test: a fresh PostgreSQL database, or (nothing
/// to do) the SQLite file in its data directory.
pub async fn use_engine_under_test(config: &mut Config) {
    if engine_under_test() == Engine::Postgres && config.database_url.is_none() {
        let url = fresh_database(&admin_url())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        config.database_url = Some(url);
    }
}

/// Runs `sql` (statements separated by `;`) on the database `config` uses, outside the
/// server. The SQL must suit both engines.
pub async fn execute(config: &Config, sql: &str) -> Result<(), String> {
    match &config.database_url {
        None => {
            let conn =
                rusqlite::Connection::open(config.database_path()).map_err(|e| e.to_string())?;
            conn.execute_batch(sql).map_err(|e| e.to_string())
        }
        Some(url) => {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let driver = tokio::spawn(connection);
            let result = client.batch_execute(sql).await.map_err(|e| e.to_string());
            drop(client);
            let _ = driver.await;
            result
        }
    }
}

/// The single integer `sql` selects, on the database `config` uses.
pub async fn query_i64(config: &Config, sql: &str) -> Result<i64, String> {
    match &config.database_url {
        None => {
            let conn =
                rusqlite::Connection::open(config.database_path()).map_err(|e| e.to_string())?;
            conn.query_row(sql, [], |r| r.get(0))
                .map_err(|e| e.to_string())
        }
        Some(url) => {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let driver = tokio::spawn(connection);
            let result = client
                .query_one(sql, &[])
                .await
                .map(|row| row.get::<_, i64>(0))
                .map_err(|e| e.to_string());
            drop(client);
            let _ = driver.await;
            result
        }
    }
}
