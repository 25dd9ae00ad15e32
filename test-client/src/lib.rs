//! Developer tools for twilio-call-proxy, as a library so the binaries stay thin and the
//! tests can reach the same code: `play` stands in for Twilio's media stream (`replay` plays
//! one the proxy captured), `flow` for
//! the Studio Flow around it, `speaker` for a backend, `load` and `loadgen` for many calls
//! at once (`shape` makes a capture the shape of each).

#![forbid(unsafe_code)]

pub mod agent;
pub mod flow;
pub mod load;
pub mod loadgen;
pub mod play;
pub mod replay;
pub mod shape;
pub mod speaker;
pub mod tls;
