//! Rooms: one per loaded document. Placeholder: the room engineer replaces this module on
//! branch `room` with the API described in the lead's plan.
