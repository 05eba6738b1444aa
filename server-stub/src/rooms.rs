//! Rooms (PROTOCOL.md §3, §6 "Rooms", "Presence on join"): membership belongs to the
//! user, is stored, and survives reconnects and restarts; the room policy
//! (`ROOM_POLICY`) reserves room-id prefixes for roles.

use webwaka_realtime::protocol::PresenceInfo;

use crate::config::RoomPolicy;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::store::{Membership, Storage};

/// Makes `user` a member of `room`, if the policy allows. Returns the presence of the
/// room's online members (on any instance), for the joiner. The members who shared no
/// room with the joiner before are told of the joiner's presence (by the feed).
pub(crate) async fn join(
    store: &dyn Storage,
    hub: &Hub,
    policy: &RoomPolicy,
    membership: Membership,
    roles: &[String],
) -> Result<Vec<PresenceInfo>, ApiError> {
    let Membership { tenant, user, room } = &membership;
    if !policy.allows(room, roles) {
        return Err(ApiError::forbidden(format!(
            "the room policy reserves room {room:?} for other roles"
        ))
        .with_detail("roomId", room.as_str()));
    }
    let (tenant, user, room) = (tenant.clone(), user.clone(), room.clone());
    // The hub learns of it from the feed, after the commit and before this returns;
    // the feed also tells the members who could not see the joiner before, on every
    // instance.
    store.set_membership(membership, true).await?;
    Ok(hub.room_presence(&tenant, &room, &user))
}

/// Ends `user`'s membership of `room` (nothing to do when not a member).
pub(crate) async fn leave(store: &dyn Storage, membership: Membership) -> Result<(), ApiError> {
    store.set_membership(membership, false).await?;
    Ok(())
}
