//! The Twilio protocol alone: Media Streams messages, request signatures, stream status
//! callbacks, and the REST calls that start and stop a stream. Imports nothing else of this
//! crate.

mod fast_media;
pub mod messages;
pub mod params;
pub mod rest;
pub mod signature;
pub mod stream_status;
