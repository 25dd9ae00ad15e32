//! Live hand-off: a draining instance moves a one-way stream to a ready instance, and the
//! backends hear one call.
//!
//! The instance the call leaves (A) asks Twilio's REST API for a new stream on the call, to
//! the public `/media` URL (the load balancer sends it to a ready instance), with the call's
//! parameters and a fresh single-use hand-off token naming the old stream. The instance that
//! receives it (B, any instance: everything goes through the store) opens the same backends
//! and, at the new stream's first frame, notes the switch in the store and holds its frames.
//! A, seeing the note, stops forwarding, tells B (through the store) the arrival time of the
//! last frame it forwarded, sends its backends `stop` with `handedOffTo`, and stops its stream
//! through the REST API. B forwards its held frames that arrived after that instant, and goes
//! on live. Twilio sends the same audio on both streams while they overlap, so the backends
//! get the call with at most a frame repeated or missing at the join.
//!
//! Nothing here runs on a call's audio path: each side's store and REST calls run in a task
//! of their own, which tells the session its news through a [`Mailbox`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tracing::{info, warn};

use super::MediaHub;
use crate::clock::unix_now;
use crate::gate::route_token;
use crate::metrics::HandoffOutcome;
use crate::twilio::messages::Start;
use crate::twilio::rest::{self, NewStream};

/// How often each side looks in the store for the other's note.
const POLL: Duration = Duration::from_millis(20);

/// How long the store keeps a hand-off's notes: long after either side could read them.
const NOTES_LAST: Duration = Duration::from_secs(300);

/// The note the new stream writes at its first frame: `<new stream sid> <unix ms>`.
fn switch_key(old: &str) -> String {
    format!("handoff:{old}")
}

/// The note the old instance writes: the arrival (unix ms) of the last frame it forwarded,
/// or `abandoned`.
fn cut_key(old: &str) -> String {
    format!("handoff-cut:{old}")
}

const ABANDONED: &str = "abandoned";

/// What a hand-off's task tells the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum News {
    /// (leaving) The new stream has its first frame: stop forwarding now.
    Switch { to: String },
    /// (leaving) The hand-off failed; the call stays and drains as usual.
    Failed,
    /// (joining) The old stream forwarded the frames that arrived up to this instant (unix
    /// ms); the held frames after it go on.
    Cut(u64),
    /// (joining) The old instance gave the hand-off up and stops this stream: it forwarded
    /// everything itself.
    Abandoned,
    /// (joining) No word from the old instance in time (it is gone): everything held goes on.
    Orphaned,
}

/// One piece of news at a time from a task to its session, and the bell the session watches.
#[derive(Default)]
pub struct Mailbox {
    news: Mutex<Option<News>>,
    bell: Notify,
}

impl Mailbox {
    fn post(&self, news: News) {
        *self.news.lock().unwrap_or_else(|e| e.into_inner()) = Some(news);
        self.bell.notify_one();
    }

    /// The news, if any has come.
    pub fn take(&self) -> Option<News> {
        self.news.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Rings once news is posted (or was posted before the call).
    pub fn rung(self: &Arc<Self>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let me = self.clone();
        async move { me.bell.notified().await }
    }
}

/// What a call needs to move: the backends it has, and whose call it is.
#[derive(Debug, Clone)]
pub struct Movable {
    pub backend_ids: Vec<String>,
    pub backend_hosts: Vec<String>,
    pub caller: Option<String>,
}

/// The REST side of hand-offs, built once per instance when `server.handoff` is on.
pub struct Mover {
    client: rest::Client,
    /// `wss://…/media`: where the new streams go.
    media_url: String,
    /// `https://…/twilio/stream-status`: Twilio's reports on them.
    status_url: String,
    pub timeout: Duration,
}

impl Mover {
    pub fn new(settings: &crate::config::Settings) -> Result<Option<Mover>, rest::RestError> {
        if !settings.server.handoff {
            return Ok(None);
        }
        let t = &settings.twilio;
        let (username, password) = if t.api_key_sid.is_empty() {
            (t.account_sid.clone(), t.auth_token.expose().to_string())
        } else {
            (t.api_key_sid.clone(), t.api_key_secret.expose().to_string())
        };
        let timeout = Duration::from_millis(settings.server.handoff_timeout_ms);
        let client = rest::Client::new(
            &t.api_base_url,
            rest::Credentials {
                account_sid: t.account_sid.clone(),
                username,
                password,
            },
            timeout,
        )?;
        let public = t.public_url.trim_end_matches('/');
        let media_url = match public.split_once("://") {
            Some(("http", rest)) => format!("ws://{rest}/media"),
            Some((_, rest)) => format!("wss://{rest}/media"),
            None => format!("wss://{public}/media"),
        };
        Ok(Some(Mover {
            client,
            media_url,
            status_url: format!("{public}/twilio/stream-status"),
            timeout,
        }))
    }
}

/// The old side of a hand-off, run beside the session: asks Twilio for the new stream, waits
/// for its first frame's note, hands the session the switch, writes the session's cut to the
/// store, and stops the old stream. Every failure leaves the call where it is.
pub async fn leave(
    hub: Arc<MediaHub>,
    start: Arc<Start>,
    movable: Movable,
    mailbox: Arc<Mailbox>,
    cut: oneshot::Receiver<u64>,
) {
    let Some(mover) = hub.mover() else { return };
    let old = start.stream_sid.clone();
    let new = NewStream {
        url: mover.media_url.clone(),
        name: None,
        track: Some(track(&start.tracks).to_string()),
        status_callback: Some(mover.status_url.clone()),
        parameters: parameters(&hub, &start, &movable, mover.timeout),
    };
    let began = std::time::Instant::now();
    let created = match mover.client.start_stream(&start.call_sid, &new).await {
        Ok(created) => created,
        Err(e) => {
            warn!(fault = "twilio", error = %e, "hand-off: Twilio did not start the new stream; the call stays here");
            hub.metrics.handoff(HandoffOutcome::rest_failed);
            mailbox.post(News::Failed);
            return;
        }
    };
    info!(to = %crate::logging::escape(&created.sid), "hand-off: Twilio started the new stream");
    let store = hub.store.clone();
    let deadline = tokio::time::Instant::now() + mover.timeout;
    let switched = loop {
        match store.noted(&switch_key(&old)).await {
            Ok(Some(note)) => break note.split(' ').next().map(str::to_string),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "hand-off: the store did not answer; asking again"),
        }
        if tokio::time::Instant::now() >= deadline || mailbox_gone(&mailbox) {
            break None;
        }
        tokio::time::sleep(POLL).await;
    };
    let Some(to) = switched else {
        // Given up first, then the new stream stopped: an instance that notes the switch
        // after this reads the abandonment and forwards nothing.
        let _ = store.note_once(&cut_key(&old), ABANDONED, NOTES_LAST).await;
        let outcome = if mailbox_gone(&mailbox) {
            HandoffOutcome::call_ended
        } else {
            warn!(
                fault = "twilio",
                timeout_ms = mover.timeout.as_millis() as u64,
                "hand-off: the new stream reached no instance in time; the call stays here"
            );
            HandoffOutcome::timed_out
        };
        hub.metrics.handoff(outcome);
        mailbox.post(News::Failed);
        stop_stream(mover, &start.call_sid, &created.sid).await;
        return;
    };
    mailbox.post(News::Switch { to: to.clone() });
    // The session answers with the arrival of the last frame it forwarded.
    let Ok(last) = cut.await else {
        let _ = store.note_once(&cut_key(&old), ABANDONED, NOTES_LAST).await;
        hub.metrics.handoff(HandoffOutcome::call_ended);
        return;
    };
    if let Err(e) = store
        .note_once(&cut_key(&old), &last.to_string(), NOTES_LAST)
        .await
    {
        // The new stream then goes live with everything it held: a few frames twice, none lost.
        warn!(error = %e, "hand-off: the store did not take the cut; the new stream repeats a few frames");
    }
    hub.metrics.handoff(HandoffOutcome::moved);
    info!(
        to = %crate::logging::escape(&to),
        took_ms = began.elapsed().as_millis() as u64,
        "hand-off: the backends moved to the new stream"
    );
    stop_stream(mover, &start.call_sid, &old).await;
}

/// The session has ended (it dropped its side of the mailbox).
fn mailbox_gone(mailbox: &Arc<Mailbox>) -> bool {
    Arc::strong_count(mailbox) == 1
}

async fn stop_stream(mover: &Mover, call_sid: &str, sid: &str) {
    if let Err(e) = mover.client.stop_stream(call_sid, sid).await {
        // The session ends the stream from its side at its deadline anyway.
        warn!(fault = "twilio", error = %e, stream = %crate::logging::escape(sid), "hand-off: Twilio did not stop the stream");
    }
}

/// The REST API's name for the tracks a stream carries.
fn track(tracks: &[String]) -> &'static str {
    let has = |t: &str| tracks.iter().any(|x| x.trim_end_matches("_track") == t);
    match (has("inbound"), has("outbound")) {
        (true, true) => "both_tracks",
        (false, true) => "outbound_track",
        _ => "inbound_track",
    }
}

/// The new stream's parameters: the call's own, its route token replaced by a hand-off token
/// for this call and these backends, and `handoffOf` naming the old stream.
fn parameters(
    hub: &MediaHub,
    start: &Start,
    movable: &Movable,
    timeout: Duration,
) -> Vec<(String, String)> {
    let claims = route_token::Claims {
        caller: movable.caller.clone().unwrap_or_default(),
        backend_ids: movable.backend_ids.clone(),
        backend_hosts: movable.backend_hosts.clone(),
        // Long enough for Twilio to connect, no longer.
        expires_at: unix_now() + timeout.as_secs() + 60,
        call_sid: Some(start.call_sid.clone()),
        nonce: route_token::nonce(),
        handoff_of: Some(start.stream_sid.clone()),
    };
    let token = route_token::issue(hub.settings.security.route_token_secret.expose(), &claims);
    let mut parameters: Vec<(String, String)> = start
        .custom_parameters
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "routeToken" | "handoffOf"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .take(rest::MAX_PARAMETERS - 2)
        .collect();
    parameters.push(("routeToken".into(), token));
    parameters.push(("handoffOf".into(), start.stream_sid.clone()));
    parameters
}

/// The new side of a hand-off, run beside the session: once the session has the new stream's
/// first frame (its arrival in unix ms comes through `first`), notes the switch for the old
/// instance and waits for its cut.
pub async fn join(
    hub: Arc<MediaHub>,
    old: String,
    new: String,
    first: oneshot::Receiver<u64>,
    mailbox: Arc<Mailbox>,
) {
    let Ok(at) = first.await else { return };
    let store = hub.store.clone();
    let timeout = Duration::from_millis(hub.settings.server.handoff_timeout_ms);
    if let Err(e) = store
        .note_once(&switch_key(&old), &format!("{new} {at}"), NOTES_LAST)
        .await
    {
        warn!(error = %e, "hand-off: the store did not take the switch; this stream goes live with all it has");
        mailbox.post(News::Orphaned);
        return;
    }
    // The old instance answers within a few polls; it gives up only after its own timeout.
    let deadline = tokio::time::Instant::now() + timeout * 2;
    loop {
        match store.noted(&cut_key(&old)).await {
            Ok(Some(note)) if note == ABANDONED => {
                mailbox.post(News::Abandoned);
                return;
            }
            Ok(Some(note)) => {
                mailbox.post(note.parse().map_or(News::Orphaned, News::Cut));
                return;
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "hand-off: the store did not answer; asking again"),
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                from = %old,
                "hand-off: the old stream's instance never said where it stopped; this stream goes live with all it has"
            );
            mailbox.post(News::Orphaned);
            return;
        }
        if mailbox_gone(&mailbox) {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_are_named_as_the_rest_api_names_them() {
        let t = |v: &[&str]| track(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(t(&["inbound"]), "inbound_track");
        assert_eq!(t(&["inbound", "outbound"]), "both_tracks");
        assert_eq!(t(&["outbound_track"]), "outbound_track");
        assert_eq!(t(&[]), "inbound_track");
    }
}
