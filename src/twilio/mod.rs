//! The Twilio protocol alone: Media Streams messages. Imports nothing else of this crate.

pub mod messages;
