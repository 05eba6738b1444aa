//! Consumer groups and the dead-letter queue in SQLite (PROTOCOL.md §4, §6 "Consumer
//! groups", "DLQ").
//!
//! A group sees every durable event of its tenant, from the oldest retained one. Each
//! (group, event) pair has a delivery row: `leased` (claimed, lease running), `pending`
//! (lease expired, waiting to be claimed again), `acked`, or `dead` (in the DLQ). A
//! lease that expires counts as a failed delivery; after `1 + EVENT_BUS_MAX_RETRIES`
//! deliveries the event moves to the DLQ. Replaying a DLQ entry makes the same event
//! claimable again by that group with a fresh budget.
//!
//! Everything here runs on the writer thread (claims change state), except the DLQ
//! listing and the lag figures, which are reads. The writer runs one job at a time, so
//! a lease is exclusive.

use rusqlite::{Connection, OptionalExtension, params};
use webwaka_realtime::protocol::{ClaimedEvent, ConsumerInfo, DlqEntry, Event};

use super::db::Writer;
use crate::error::{ApiError, JobError, StoreError};
use crate::store::{Claim, LEASE_EXPIRED};
use crate::time::ms_to_time;

/// Expires the leases that ran out before `now_ms` (of one group, or all): each becomes
/// claimable again, or moves to the DLQ once it has been delivered `1 + max_retries`
/// times. Returns how many moved to the DLQ.
pub(super) fn expire_leases(
    w: &mut Writer<'_>,
    scope: Option<(&str, &str)>,
    now_ms: i64,
    max_retries: u32,
) -> Result<u64, JobError> {
    type Row = (
        String,
        String,
        i64,
        String,
        i64,
        Option<String>,
        Option<i64>,
        Option<String>,
    );
    let rows: Vec<Row> = {
        let (tenant, grp) = scope.unwrap_or(("", ""));
        let mut stmt = w.conn.prepare_cached(
            "SELECT d.tenant, d.grp, d.seq, d.event_id, d.delivery_count, d.consumer_id,
                    d.first_failed_ms, COALESCE(d.body, e.body)
             FROM group_deliveries d
             LEFT JOIN events e ON e.tenant = d.tenant AND e.seq = d.seq
             WHERE d.state = 'leased' AND d.lease_expires_ms <= ?1
               AND (?2 = '' OR (d.tenant = ?2 AND d.grp = ?3))",
        )?;
        let rows = stmt.query_map(params![now_ms, tenant, grp], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
                row.get(7)?,
            ))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    let mut dead = 0;
    for (tenant, grp, seq, event_id, count, consumer, first_failed, body) in rows {
        let first_failed = first_failed.unwrap_or(now_ms);
        let Some(body) = body else {
            // The event is gone (retention): nothing left to deliver.
            w.conn
                .prepare_cached(
                    "DELETE FROM group_deliveries WHERE tenant = ?1 AND grp = ?2 AND seq = ?3",
                )?
                .execute(params![tenant, grp, seq])?;
            continue;
        };
        // Delivered 1 + max_retries times: dead-letter it.
        if count > i64::from(max_retries) {
            w.conn
                .prepare_cached(
                    "UPDATE group_deliveries SET state = 'dead', lease_expires_ms = NULL,
                            first_failed_ms = ?4, last_failed_ms = ?5
                     WHERE tenant = ?1 AND grp = ?2 AND seq = ?3",
                )?
                .execute(params![tenant, grp, seq, first_failed, now_ms])?;
            w.conn
                .prepare_cached(
                    "INSERT INTO dlq (dlq_id, tenant, grp, seq, event_id, body, failure_reason,
                                      retry_count, first_failed_ms, last_failed_ms, consumer_id, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?10)",
                )?
                .execute(params![
                    format!("dlq-{}", uuid::Uuid::now_v7()),
                    tenant,
                    grp,
                    seq,
                    event_id,
                    body,
                    LEASE_EXPIRED,
                    count,
                    first_failed,
                    now_ms,
                    consumer.unwrap_or_default(),
                ])?;
            dead += 1;
        } else {
            w.conn
                .prepare_cached(
                    "UPDATE group_deliveries SET state = 'pending', lease_expires_ms = NULL,
                            first_failed_ms = ?4, last_failed_ms = ?5
                     WHERE tenant = ?1 AND grp = ?2 AND seq = ?3",
                )?
                .execute(params![tenant, grp, seq, first_failed, now_ms])?;
        }
    }
    Ok(dead)
}

/// Leases up to `claim.max` events to the group: first those waiting for redelivery,
/// then new ones, in sequence order.
pub(super) fn claim(
    w: &mut Writer<'_>,
    claim: &Claim,
    now_ms: i64,
    max_retries: u32,
) -> Result<Vec<ClaimedEvent>, JobError> {
    let (tenant, grp) = (claim.tenant.as_str(), claim.group.as_str());
    w.conn
        .prepare_cached(
            "INSERT OR IGNORE INTO consumer_groups (tenant, grp, created_ms, scan_from)
             VALUES (?1, ?2, ?3, 0)",
        )?
        .execute(params![tenant, grp, now_ms])?;
    expire_leases(w, Some((tenant, grp)), now_ms, max_retries)?;
    let scan_from: i64 = w
        .conn
        .prepare_cached("SELECT scan_from FROM consumer_groups WHERE tenant = ?1 AND grp = ?2")?
        .query_row(params![tenant, grp], |row| row.get(0))?;
    let limit = i64::from(claim.max);
    let event_types = claim
        .event_types
        .as_ref()
        .map(serde_json::to_string)
        .transpose()?;
    // (seq, body, is_redelivery)
    let mut candidates: Vec<(i64, String, bool)> = Vec::new();
    {
        let mut stmt = w.conn.prepare_cached(
            "SELECT d.seq, COALESCE(d.body, e.body) AS b
             FROM group_deliveries d
             LEFT JOIN events e ON e.tenant = d.tenant AND e.seq = d.seq
             WHERE d.tenant = ?1 AND d.grp = ?2 AND d.state = 'pending' AND b IS NOT NULL
               AND (?3 IS NULL OR json_extract(b, '$.eventType') IN (SELECT value FROM json_each(?3)))
             ORDER BY d.seq LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![tenant, grp, event_types, limit], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, true))
        })?;
        for row in rows {
            candidates.push(row?);
        }
    }
    {
        let mut stmt = w.conn.prepare_cached(
            "SELECT e.seq, e.body FROM events e
             WHERE e.tenant = ?1 AND e.seq > ?2
               AND NOT EXISTS (SELECT 1 FROM group_deliveries d
                               WHERE d.tenant = e.tenant AND d.grp = ?3 AND d.seq = e.seq)
               AND (?4 IS NULL OR e.event_type IN (SELECT value FROM json_each(?4)))
             ORDER BY e.seq LIMIT ?5",
        )?;
        let rows = stmt.query_map(params![tenant, scan_from, grp, event_types, limit], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, false))
        })?;
        for row in rows {
            candidates.push(row?);
        }
    }
    candidates.sort_by_key(|(seq, _, _)| *seq);
    candidates.truncate(claim.max as usize);
    let lease_until = now_ms + claim.visibility_ms;
    let mut out = Vec::with_capacity(candidates.len());
    let mut new_scan = None;
    for (seq, body, redelivery) in candidates {
        let event: Event = serde_json::from_str(&body)?;
        let count: i64 = if redelivery {
            w.conn
                .prepare_cached(
                    "UPDATE group_deliveries
                     SET state = 'leased', delivery_count = delivery_count + 1,
                         consumer_id = ?4, lease_expires_ms = ?5
                     WHERE tenant = ?1 AND grp = ?2 AND seq = ?3
                     RETURNING delivery_count",
                )?
                .query_row(
                    params![tenant, grp, seq, claim.consumer_id, lease_until],
                    |row| row.get(0),
                )?
        } else {
            w.conn
                .prepare_cached(
                    "INSERT INTO group_deliveries (tenant, grp, seq, event_id, state, delivery_count,
                                                   consumer_id, lease_expires_ms)
                     VALUES (?1, ?2, ?3, ?4, 'leased', 1, ?5, ?6)",
                )?
                .execute(params![tenant, grp, seq, event.event_id, claim.consumer_id, lease_until])?;
            new_scan = Some(seq);
            1
        };
        out.push(ClaimedEvent {
            event,
            delivery_count: u32::try_from(count).unwrap_or(u32::MAX),
            lease_expires_at: ms_to_time(lease_until),
        });
    }
    // Without a type filter, every event up to the last new one claimed now has a row:
    // later scans can start after it.
    if claim.event_types.is_none()
        && let Some(seq) = new_scan
    {
        w.conn
            .prepare_cached(
                "UPDATE consumer_groups SET scan_from = ?3 WHERE tenant = ?1 AND grp = ?2",
            )?
            .execute(params![tenant, grp, seq])?;
    }
    Ok(out)
}

/// Acknowledges `event_ids` for the group; returns how many were leased to it.
pub(super) fn ack(
    w: &mut Writer<'_>,
    tenant: &str,
    grp: &str,
    event_ids: &[String],
) -> Result<u64, JobError> {
    let mut acked = 0;
    let mut stmt = w.conn.prepare_cached(
        "UPDATE group_deliveries SET state = 'acked', lease_expires_ms = NULL
         WHERE tenant = ?1 AND grp = ?2 AND event_id = ?3 AND state IN ('leased', 'pending')",
    )?;
    for id in event_ids {
        acked += stmt.execute(params![tenant, grp, id])? as u64;
    }
    Ok(acked)
}

/// The tenant's DLQ entries (of one group when given), oldest first.
pub(super) fn dlq(
    conn: &Connection,
    tenant: &str,
    grp: Option<&str>,
) -> Result<Vec<DlqEntry>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT dlq_id, body, failure_reason, retry_count, first_failed_ms, last_failed_ms,
                consumer_id, grp
         FROM dlq WHERE tenant = ?1 AND (?2 IS NULL OR grp = ?2)
         ORDER BY created_ms, dlq_id LIMIT 1000",
    )?;
    let rows = stmt.query_map(params![tenant, grp], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, i64>(3)?,
            row.get::<_, i64>(4)?,
            row.get::<_, i64>(5)?,
            row.get::<_, String>(6)?,
            row.get::<_, String>(7)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (dlq_id, body, reason, retries, first, last, consumer, grp) = row?;
        out.push(DlqEntry {
            dlq_id,
            original_event: serde_json::from_str(&body)?,
            failure_reason: reason,
            failure_stack_trace: None,
            retry_count: u32::try_from(retries).unwrap_or(u32::MAX),
            first_failed_at: ms_to_time(first),
            last_failed_at: ms_to_time(last),
            consumer_info: ConsumerInfo {
                consumer_id: consumer,
                consumer_group: Some(grp),
            },
        });
    }
    Ok(out)
}

/// Makes a DLQ entry's event claimable again by its group (fresh budget) and removes
/// the entry. Returns (group, eventId).
pub(super) fn replay(
    w: &mut Writer<'_>,
    tenant: &str,
    dlq_id: &str,
) -> Result<(String, String), JobError> {
    let entry = w
        .conn
        .prepare_cached(
            "SELECT grp, seq, event_id, body FROM dlq WHERE tenant = ?1 AND dlq_id = ?2",
        )?
        .query_row(params![tenant, dlq_id], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
            ))
        })
        .optional()?;
    let Some((grp, seq, event_id, body)) = entry else {
        return Err(ApiError::not_found(format!("no DLQ entry {dlq_id:?}")).into());
    };
    w.conn
        .prepare_cached("DELETE FROM dlq WHERE dlq_id = ?1")?
        .execute([dlq_id])?;
    w.conn
        .prepare_cached(
            "INSERT INTO group_deliveries (tenant, grp, seq, event_id, state, delivery_count, body)
             VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5)
             ON CONFLICT (tenant, grp, seq) DO UPDATE SET
                state = 'pending', delivery_count = 0, consumer_id = NULL,
                lease_expires_ms = NULL, first_failed_ms = NULL, last_failed_ms = NULL,
                body = excluded.body",
        )?
        .execute(params![tenant, grp, seq, event_id, body])?;
    Ok((grp, event_id))
}

/// Events not yet acked (or dead-lettered), per (tenant, group).
pub(super) fn lag(conn: &Connection) -> Result<Vec<(String, String, i64)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT g.tenant, g.grp,
                (SELECT count(*) FROM events e WHERE e.tenant = g.tenant AND NOT EXISTS
                    (SELECT 1 FROM group_deliveries d
                     WHERE d.tenant = e.tenant AND d.grp = g.grp AND d.seq = e.seq
                       AND d.state IN ('acked', 'dead')))
         FROM consumer_groups g",
    )?;
    let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row?);
    }
    Ok(out)
}

/// The tenant's deliveries per group and state, and its open leases.
pub(super) fn deliveries(
    conn: &Connection,
    tenant: &str,
) -> Result<crate::store::GroupDeliveries, StoreError> {
    use crate::store::{GroupCount, GroupDeliveries, OPEN_DELIVERIES, OpenDelivery};
    let mut stmt = conn.prepare_cached(
        "SELECT grp, state, count(*), sum(delivery_count) FROM group_deliveries
         WHERE tenant = ?1 GROUP BY grp, state ORDER BY grp, state",
    )?;
    let counts = stmt
        .query_map(params![tenant], |row| {
            Ok(GroupCount {
                group: row.get(0)?,
                state: row.get(1)?,
                events: row.get(2)?,
                deliveries: row.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = conn.prepare_cached(
        "SELECT grp, seq, event_id, state, delivery_count, consumer_id, lease_expires_ms
         FROM group_deliveries WHERE tenant = ?1 AND state IN ('leased', 'pending')
         ORDER BY grp, seq LIMIT ?2",
    )?;
    let open = stmt
        .query_map(params![tenant, OPEN_DELIVERIES], |row| {
            Ok(OpenDelivery {
                group: row.get(0)?,
                seq: row.get(1)?,
                event_id: row.get(2)?,
                state: row.get(3)?,
                delivery_count: row.get(4)?,
                consumer_id: row.get(5)?,
                lease_expires_ms: row.get(6)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GroupDeliveries { counts, open })
}
