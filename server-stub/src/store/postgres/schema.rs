//! The PostgreSQL schema: refinery migrations (`server-stub/migrations/postgres`),
//! applied by one instance at a time behind a session advisory lock, and refused when
//! the database was migrated by a newer server.

use tokio_postgres::{Client, NoTls};

use super::pg_error;
use crate::error::StoreError;

refinery::embed_migrations!("migrations/postgres");

/// The advisory lock key instances take turns on while migrating ("webwaka" in ASCII).
const MIGRATION_LOCK: i64 = 0x0077_6562_7761_6b61;

/// Brings the schema up to date on a dedicated connection. Several instances starting
/// at once against one fresh database migrate it once: the others wait for the lock,
/// then find nothing to do.
pub(super) async fn migrate(config: &tokio_postgres::Config) -> Result<(), StoreError> {
    let (mut client, connection) = config.connect(NoTls).await.map_err(pg_error)?;
    let driver = tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "migration connection ended");
        }
    });
    let result = migrate_on(&mut client).await;
    drop(client);
    let _ = driver.await;
    result
}

async fn migrate_on(client: &mut Client) -> Result<(), StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_error)?;
    let result = async {
        let runner = migrations::runner();
        let known = runner
            .get_migrations()
            .iter()
            .map(|m| m.version())
            .max()
            .unwrap_or(0);
        let applied = applied_version(client).await?;
        if let Some(applied) = applied
            && applied > known
        {
            return Err(StoreError::Corrupt(format!(
                "the database schema is newer than this server (migration V{applied} applied, \
                 this server knows up to V{known}): run a newer webwaka-server-stub"
            )));
        }
        let report = runner
            .run_async(client)
            .await
            .map_err(|e| StoreError::Corrupt(format!("PostgreSQL migration failed: {e}")))?;
        for migration in report.applied_migrations() {
            tracing::info!(
                version = migration.version(),
                name = migration.name(),
                "migrated"
            );
        }
        Ok(())
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_error)?;
    result
}

/// The newest migration applied, if the schema history exists.
async fn applied_version(client: &Client) -> Result<Option<u32>, StoreError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let version: Option<i32> = client
        .query_one("SELECT max(version) FROM refinery_schema_history", &[])
        .await
        .map_err(pg_error)?
        .get(0);
    Ok(version.and_then(|v| u32::try_from(v).ok()))
}
