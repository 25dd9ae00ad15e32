//! Developer tools for twilio-call-proxy, as a library so the binaries stay thin and the
//! tests can reach the same code: `play` stands in for Twilio, `speaker` for a backend.

#![forbid(unsafe_code)]

pub mod play;
pub mod speaker;
