//! Audio helpers shared by the service and the tools: the G.711 mu-law codec and a reader for
//! the WAV files Twilio-style audio comes in.

pub mod measure;
pub mod mulaw;
pub mod resample;
pub mod wav;

/// Twilio Media Streams audio: 8 kHz, mono, 20 ms (160 bytes) per frame.
pub const SAMPLE_RATE: u32 = 8000;
pub const FRAME_BYTES: usize = 160;
pub const FRAME_MS: u64 = 20;
