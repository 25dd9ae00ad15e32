//! A call's media quality, measured on the frames the session handles anyway: what Twilio's
//! frames show (frames it skipped, arrival jitter, the longest gap between frames) and, with a
//! voice agent, how its answers reach the caller (response time, how far ahead of playout the
//! proxy has sent, mark round trips, how long a `clear` took to reach Twilio's socket). Kept in
//! the session's own memory and published to `/calls` at the session's tick; each backend
//! link's own figures are in [`super::fanout::LinkQuality`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::audio::mulaw;
use crate::metrics::Quality;

/// What Twilio's frames show, updated per caller frame with one clock read the session has
/// already made.
#[derive(Debug, Default)]
pub struct TwilioQuality {
    last_chunk: Option<u64>,
    last_timestamp: Option<u64>,
    last_arrival: Option<Instant>,
    missing: u64,
    /// RFC 3550's interarrival jitter, in milliseconds.
    jitter_ms: f64,
    longest_gap: Duration,
    /// When Twilio's timestamp 0 would have arrived, from the least delayed frame so far:
    /// where in the call a frame is, on this machine's clock, whatever delays its reading.
    origin: Option<Instant>,
}

impl TwilioQuality {
    /// One of the caller's frames, with Twilio's counters as it wrote them.
    pub fn frame(&mut self, chunk: &str, timestamp: &str, now: Instant) {
        let chunk = chunk.parse::<u64>().ok();
        let timestamp = timestamp.parse::<u64>().ok();
        match (chunk, self.last_chunk, timestamp, self.last_timestamp) {
            // Counters come from outside: at their limits they saturate, never overflow.
            (Some(c), Some(last), _, _) => {
                self.missing = self
                    .missing
                    .saturating_add(c.saturating_sub(last.saturating_add(1)))
            }
            // No chunk counter (an older client): a jump in the timestamp past one frame.
            (None, _, Some(t), Some(last)) => {
                self.missing = self
                    .missing
                    .saturating_add(t.saturating_sub(last).saturating_sub(1) / 20)
            }
            _ => {}
        }
        if let Some(arrived) = self.last_arrival {
            let gap = now.saturating_duration_since(arrived);
            self.longest_gap = self.longest_gap.max(gap);
            if let (Some(t), Some(last)) = (timestamp, self.last_timestamp) {
                let d = gap.as_secs_f64() * 1000.0 - (t as f64 - last as f64);
                self.jitter_ms += (d.abs() - self.jitter_ms) / 16.0;
            }
        }
        if chunk.is_some() {
            self.last_chunk = chunk;
        }
        if let Some(origin) = timestamp.and_then(|t| now.checked_sub(Duration::from_millis(t))) {
            self.origin = Some(self.origin.map_or(origin, |o| o.min(origin)));
        }
        self.last_timestamp = timestamp.or(self.last_timestamp);
        self.last_arrival = Some(now);
    }

    /// Where in the call the last frame is: when it would have arrived undelayed (without
    /// Twilio's timestamps, when it did arrive).
    pub fn last_position(&self) -> Option<Instant> {
        match (self.origin, self.last_timestamp) {
            (Some(origin), Some(ts)) => Some(origin + Duration::from_millis(ts)),
            _ => self.last_arrival,
        }
    }

    pub fn view(&self) -> TwilioView {
        TwilioView {
            frames_missing: self.missing,
            jitter_ms: self.jitter_ms,
            longest_gap_ms: self.longest_gap.as_secs_f64() * 1000.0,
        }
    }

    /// The call has ended: its figures into the histograms.
    pub fn observe(&self, quality: &Quality) {
        quality.frames_missing.observe(self.missing as f64);
        quality.jitter.observe(self.jitter_ms / 1000.0);
        quality.longest_gap.observe(self.longest_gap.as_secs_f64());
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct TwilioView {
    pub frames_missing: u64,
    pub jitter_ms: f64,
    pub longest_gap_ms: f64,
}

/// Mean magnitude above which a caller frame counts as speech (about -40 dBFS).
const SPEECH_LEVEL: u32 = 330;
/// Agent audio after this long without any starts a new answer.
const NEW_ANSWER_AFTER: Duration = Duration::from_millis(500);
/// A response is measured only from speech this recent.
const RESPONSE_WITHIN: Duration = Duration::from_secs(30);
/// Marks awaiting Twilio's echo, at most.
const MARKS_KEPT: usize = 64;

/// Whether a caller frame (mu-law) holds speech: its mean magnitude over a threshold.
pub fn is_speech(audio: &[u8]) -> bool {
    if audio.is_empty() {
        return false;
    }
    let sum: u32 = audio
        .iter()
        .map(|&c| u32::from(mulaw::decode(c).unsigned_abs()))
        .sum();
    sum / audio.len() as u32 > SPEECH_LEVEL
}

/// How a voice agent's answers reach the caller, measured where they go onto Twilio's socket.
#[derive(Debug, Default)]
pub struct TalkbackQuality {
    /// When the caller last spoke (a frame over the speech level).
    pub caller_spoke: Option<Instant>,
    last_audio: Option<Instant>,
    /// When what has been sent will have played, at Twilio's real-time pace.
    playout_end: Option<Instant>,
    marks: VecDeque<(String, Instant)>,
    response_last: Option<Duration>,
    response_worst: Duration,
    lead: Duration,
    lead_worst: Duration,
    mark_last: Option<Duration>,
    clear_last: Option<Duration>,
}

impl TalkbackQuality {
    /// Agent audio of `audio_ms` went onto Twilio's socket `now`.
    pub fn audio(&mut self, audio_ms: u64, now: Instant, quality: &Quality) {
        let new_answer = self
            .last_audio
            .is_none_or(|t| now.saturating_duration_since(t) > NEW_ANSWER_AFTER);
        if new_answer {
            if let Some(spoke) = self.caller_spoke {
                let response = now.saturating_duration_since(spoke);
                if response < RESPONSE_WITHIN {
                    self.response_last = Some(response);
                    self.response_worst = self.response_worst.max(response);
                    quality.response.observe(response.as_secs_f64());
                }
            }
        }
        self.last_audio = Some(now);
        let end = self.playout_end.map_or(now, |e| e.max(now)) + Duration::from_millis(audio_ms);
        self.playout_end = Some(end);
        self.lead = end.saturating_duration_since(now);
        self.lead_worst = self.lead_worst.max(self.lead);
    }

    /// A mark went onto Twilio's socket `now`.
    pub fn mark_sent(&mut self, name: String, now: Instant) {
        if self.marks.len() == MARKS_KEPT {
            self.marks.pop_front();
        }
        self.marks.push_back((name, now));
    }

    /// Twilio echoed a mark: the audio before it has played.
    pub fn mark_echoed(&mut self, name: &str, quality: &Quality) {
        if let Some(at) = self.marks.iter().position(|(n, _)| n == name) {
            let (_, sent) = self.marks.remove(at).expect("found");
            let rtt = sent.elapsed();
            self.mark_last = Some(rtt);
            quality.mark_round_trip.observe(rtt.as_secs_f64());
        }
    }

    /// A clear the speaker sent at `said` went onto Twilio's socket `now`: nothing queued
    /// before it will play.
    pub fn cleared(&mut self, said: Option<Instant>, now: Instant, quality: &Quality) {
        self.playout_end = Some(now);
        self.lead = Duration::ZERO;
        if let Some(said) = said {
            let took = now.saturating_duration_since(said);
            self.clear_last = Some(took);
            quality.clear.observe(took.as_secs_f64());
        }
    }

    pub fn view(&self) -> TalkbackView {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let now = Instant::now();
        TalkbackView {
            response_ms: self.response_last.map(ms),
            response_worst_ms: ms(self.response_worst),
            lead_ms: ms(self
                .playout_end
                .map_or(Duration::ZERO, |e| e.saturating_duration_since(now))),
            lead_worst_ms: ms(self.lead_worst),
            mark_round_trip_ms: self.mark_last.map(ms),
            clear_ms: self.clear_last.map(ms),
        }
    }

    /// The call has ended: its most lead into the histogram.
    pub fn observe(&self, quality: &Quality) {
        quality.lead.observe(self.lead_worst.as_secs_f64());
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct TalkbackView {
    /// The latest answer's response time; `null` before the first.
    pub response_ms: Option<f64>,
    pub response_worst_ms: f64,
    /// Audio sent that has not played yet, now.
    pub lead_ms: f64,
    pub lead_worst_ms: f64,
    pub mark_round_trip_ms: Option<f64>,
    pub clear_ms: Option<f64>,
}

/// A call's quality as `/calls` and the page show it.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct CallQuality {
    pub twilio: TwilioView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub talkback: Option<TalkbackView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_frames_jitter_and_gaps_are_read_from_twilios_counters() {
        let t0 = Instant::now();
        let mut q = TwilioQuality::default();
        // Frames 1..=5 on time, then 9 (three skipped) 100 ms later than 5.
        for i in 1..=5u64 {
            let at = t0 + Duration::from_millis(i * 20);
            q.frame(&i.to_string(), &(i * 20).to_string(), at);
        }
        q.frame("9", "180", t0 + Duration::from_millis(180));
        let v = q.view();
        assert_eq!(v.frames_missing, 3);
        assert!((v.longest_gap_ms - 80.0).abs() < 1.0, "{v:?}");
        assert!(v.jitter_ms < 1.0, "on time is no jitter: {v:?}");
        // Late by 60 ms against its timestamp: jitter rises.
        q.frame("10", "200", t0 + Duration::from_millis(260));
        assert!(q.view().jitter_ms > 3.0);
        // Without chunks, a timestamp jump counts.
        let mut q = TwilioQuality::default();
        q.frame("", "0", t0);
        q.frame("", "100", t0 + Duration::from_millis(100));
        assert_eq!(q.view().frames_missing, 4);
        // Counters at their limits saturate.
        let mut q = TwilioQuality::default();
        let max = u64::MAX.to_string();
        q.frame("0", "0", t0);
        q.frame(&max, &max, t0);
        q.frame(&max, &max, t0);
        q.frame("1", "1", t0);
        q.frame(&max, &max, t0);
        assert_eq!(q.view().frames_missing, u64::MAX);
        assert!(q.view().jitter_ms.is_finite());
    }

    #[test]
    fn speech_is_told_from_silence() {
        assert!(!is_speech(&[mulaw::SILENCE; 160]));
        assert!(is_speech(&[mulaw::encode(8000); 160]));
    }
}
