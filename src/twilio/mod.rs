//! The Twilio protocol alone: Media Streams messages and request signatures. Imports nothing
//! else of this crate.

mod fast_media;
pub mod messages;
pub mod params;
pub mod signature;
