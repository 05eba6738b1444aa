//! Rooms (PROTOCOL.md §3, §6 "Rooms", "Presence on join"): membership belongs to the
//! user, is stored, and survives reconnects and restarts; the room policy
//! (`ROOM_POLICY`) reserves room-id prefixes for roles.

use std::sync::Arc;

use rusqlite::params;
use webwaka_realtime::protocol::PresenceInfo;

use crate::app::App;
use crate::db::{Db, now_ms};
use crate::error::{ApiError, StoreError};

/// Every stored membership, as (tenant, user, room).
pub(crate) fn load_all(db: &Db) -> Result<Vec<(String, String, String)>, StoreError> {
    db.read(|conn| {
        let mut stmt = conn.prepare("SELECT tenant, user_id, room_id FROM room_members")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row?);
        }
        Ok(out)
    })
}

/// Makes `user` a member of `room`, if the policy allows. Returns the presence of the
/// room's online members, for the joiner. Announces the joiner (when online) to the
/// members who shared no room with them before.
pub(crate) async fn join(
    app: &Arc<App>,
    tenant: &str,
    user: &str,
    roles: &[String],
    room: &str,
) -> Result<Vec<PresenceInfo>, ApiError> {
    if !app.policy.allows(room, roles) {
        return Err(ApiError::forbidden(format!(
            "the room policy reserves room {room:?} for other roles"
        ))
        .with_detail("roomId", room));
    }
    let before = app.hub.sharing_users(tenant, user);
    let (t, u, r) = (tenant.to_owned(), user.to_owned(), room.to_owned());
    let hub = Arc::clone(&app.hub);
    app.db
        .write(move |w| {
            w.conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO room_members (tenant, user_id, room_id, joined_ms)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![t, u, r, now_ms()])?;
            w.after_commit(move || hub.add_member(&t, &r, &u));
            Ok(())
        })
        .await?;
    let others = app.hub.room_presence(tenant, room, user);
    // Announce the joiner to the online members who could not see them before.
    let newly: std::collections::HashSet<String> = others
        .iter()
        .map(|p| p.user_id.clone())
        .filter(|m| !before.contains(m))
        .collect();
    if !newly.is_empty()
        && let Some(me) = app
            .hub
            .room_presence(tenant, room, "")
            .into_iter()
            .find(|p| p.user_id == user)
    {
        app.hub.announce(&me, Some(&newly));
    }
    Ok(others)
}

/// Ends `user`'s membership of `room` (nothing to do when not a member).
pub(crate) async fn leave(
    app: &Arc<App>,
    tenant: &str,
    user: &str,
    room: &str,
) -> Result<(), ApiError> {
    let (t, u, r) = (tenant.to_owned(), user.to_owned(), room.to_owned());
    let hub = Arc::clone(&app.hub);
    app.db
        .write(move |w| {
            w.conn
                .prepare_cached(
                    "DELETE FROM room_members WHERE tenant = ?1 AND user_id = ?2 AND room_id = ?3",
                )?
                .execute(params![t, u, r])?;
            w.after_commit(move || hub.remove_member(&t, &r, &u));
            Ok(())
        })
        .await?;
    Ok(())
}
