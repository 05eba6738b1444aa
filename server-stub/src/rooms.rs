//! Rooms (PROTOCOL.md §3, §6 "Rooms", "Presence on join"): membership belongs to the
//! user, is stored, and survives reconnects and restarts; the room policy
//! (`ROOM_POLICY`) reserves room-id prefixes for roles.

use webwaka_realtime::protocol::PresenceInfo;

use crate::config::RoomPolicy;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::store::{Membership, Storage};

/// Makes `user` a member of `room`, if the policy allows and the user is in fewer than
/// `max_rooms` rooms (`MAX_ROOMS_PER_USER`; counted from this instance's directory, so
/// joins racing on several instances may pass it by a few). Returns the presence of the
/// room's online members (on any instance), for the joiner. The members who shared no
/// room with the joiner before are told of the joiner's presence (by the feed).
pub(crate) async fn join(
    store: &dyn Storage,
    hub: &Hub,
    policy: &RoomPolicy,
    membership: Membership,
    roles: &[String],
    max_rooms: usize,
) -> Result<Vec<PresenceInfo>, ApiError> {
    let Membership { tenant, user, room } = &membership;
    if !policy.allows(room, roles) {
        return Err(ApiError::forbidden(format!(
            "the room policy reserves room {room:?} for other roles"
        ))
        .with_detail("roomId", room.as_str()));
    }
    if hub.room_count(tenant, user) >= max_rooms && !hub.is_member(tenant, room, user) {
        return Err(ApiError::forbidden(format!(
            "a user may be in at most {max_rooms} rooms (MAX_ROOMS_PER_USER): leave one first"
        ))
        .with_detail("roomId", room.as_str())
        .with_detail("reason", "MAX_ROOMS_PER_USER")
        .with_detail("maxRooms", max_rooms));
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
