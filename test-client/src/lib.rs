//! Developer tools for twilio-call-proxy, as a library so the binaries stay thin and the
//! tests can reach the same code: `play` stands in for Twilio's media stream, `flow` for
//! the Studio Flow around it, `speaker` for a backend.

#![forbid(unsafe_code)]

pub mod flow;
pub mod play;
pub mod speaker;
