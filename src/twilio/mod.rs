//! The Twilio protocol alone: Media Streams messages, request signatures and stream status
//! callbacks. Imports nothing else of this crate.

mod fast_media;
pub mod messages;
pub mod params;
pub mod signature;
pub mod stream_status;
