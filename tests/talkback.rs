//! Voice agents: a backend that talks back to the caller. Its audio reaches the caller exactly,
//! marks go round, clear cuts the backlog, bad messages are dropped and counted while the call
//! goes on, listeners are never heard, a flood ends a listener's link, and pcm16 carries a
//! tone both ways at every rate without images or folding.

mod common;

use std::time::Duration;

use base64::Engine as _;
use call_proxy::audio::measure::{db, level, tone};
use call_proxy::audio::mulaw;
use call_proxy::config::WireFormat;
use common::*;
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Settings with these backends, the ones named in `speakers` talking back.
fn talking(backends: &[(&str, &str, WireFormat)], speakers: &[&str]) -> call_proxy::Settings {
    let mut s = settings(backends);
    for id in speakers {
        s.backends.table.get_mut(*id).unwrap().speaks = true;
    }
    s.validate().unwrap();
    s
}

/// Reads what the proxy sends the caller until `done` holds over it (JSON messages).
async fn caller_hears(
    call: &mut TwilioCall,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(&got) {
        match tokio::time::timeout_at(deadline, call.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => got.push(serde_json::from_str(t.as_str()).unwrap()),
            Ok(Some(Ok(Message::Close(f)))) => panic!("closed while waiting for {what}: {f:?}"),
            Ok(Some(Ok(_))) => {}
            other => panic!("waiting for {what}: {other:?}; got {got:?}"),
        }
    }
    got
}

fn media_payloads(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m["event"] == "media")
        .map(|m| m["media"]["payload"].as_str().unwrap().to_string())
        .collect()
}

fn twilio_media(payload: &str) -> String {
    format!(r#"{{"event":"media","streamSid":"MZagent","media":{{"payload":"{payload}"}}}}"#)
}

#[tokio::test]
async fn the_agents_audio_reaches_the_caller_exactly_and_a_listener_is_never_heard() {
    let mut agent = TalkingBackend::start().await;
    let mut listener = TalkingBackend::start().await;
    let proxy = Proxy::start(talking(
        &[
            ("agent", &agent.url(), WireFormat::Twilio),
            ("listener", &listener.url(), WireFormat::Twilio),
        ],
        &["agent"],
    ))
    .await;
    let mut call = TwilioCall::connect(&proxy, "talk").await;
    call.start(&[("backendIds", "agent,listener")]).await;
    agent.wait_for_start(1).await;
    listener.wait_for_start(1).await;
    for i in 0..5 {
        listener.say_text(twilio_media(&payload(1000 + i)));
    }
    for i in 0..20 {
        agent.say_text(twilio_media(&payload(i)));
    }
    let heard = caller_hears(&mut call, "20 frames", |m| media_payloads(m).len() >= 20).await;
    assert_eq!(
        media_payloads(&heard),
        (0..20).map(payload).collect::<Vec<_>>(),
        "in order, exact"
    );
    for m in &heard {
        assert_eq!(m["streamSid"], "MZtalk", "on the call's stream: {m}");
    }
    // Nothing more comes: the listener's five frames were never forwarded.
    let more = tokio::time::timeout(Duration::from_millis(300), call.ws.next()).await;
    assert!(more.is_err(), "the caller heard more: {more:?}");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_backend_ignored_messages_total{backend="listener"}"#
        ),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_talkback_messages_out_total{backend="agent"}"#
        ),
        Some(20.0)
    );
    call.stop().await;
}

/// A call to a speaking agent and a recorder beside it, both Twilio format, under way.
async fn agent_and_recorder(name: &str) -> (TalkingBackend, Backend, Proxy, TwilioCall) {
    let mut agent = TalkingBackend::start().await;
    let rec = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(talking(
        &[
            ("agent", &agent.url(), WireFormat::Twilio),
            ("rec", &rec.url(), WireFormat::Twilio),
        ],
        &["agent"],
    ))
    .await;
    let mut call = TwilioCall::connect(&proxy, name).await;
    call.start(&[("backendIds", "agent,rec")]).await;
    agent.wait_for_start(1).await;
    (agent, rec, proxy, call)
}

#[tokio::test]
async fn a_mark_goes_round_and_only_the_speaker_hears_its_echo() {
    let (mut agent, mut rec, _proxy, mut call) = agent_and_recorder("mark").await;
    agent.say_text(twilio_media(&payload(0)));
    agent.say_text(r#"{"event":"mark","streamSid":"MZagent","mark":{"name":"greeting-done"}}"#);
    let heard = caller_hears(&mut call, "the mark", |m| {
        m.iter().any(|m| m["event"] == "mark")
    })
    .await;
    let mark = heard.iter().find(|m| m["event"] == "mark").unwrap();
    assert_eq!(mark["mark"]["name"], "greeting-done");
    assert_eq!(mark["streamSid"], "MZmark");
    // Twilio echoes the mark once it has played the audio before it.
    call.send_text(
        r#"{"event":"mark","sequenceNumber":"4","streamSid":"MZmark","mark":{"name":"greeting-done"}}"#.into(),
    )
    .await;
    agent
        .wait_for("the echo", |log| {
            log.iter()
                .any(|(_, m)| m.to_text().is_ok_and(|t| t.contains("greeting-done")))
        })
        .await;
    call.stop().await;
    rec.wait_for_stop().await;
    assert!(
        !rec.texts().iter().any(|t| event(t) == "mark"),
        "a backend that does not speak gets no marks"
    );
}

#[tokio::test]
async fn clear_reaches_the_caller_first_and_the_backlog_before_it_is_never_played() {
    let mut agent = TalkingBackend::start().await;
    let mut s = talking(&[("agent", &agent.url(), WireFormat::Twilio)], &["agent"]);
    // This agent says far more than any real one at once, to overflow every buffer on the
    // way: its per-second limits are lifted for it.
    s.backends.max_speaker_messages_per_second = 1_000_000;
    s.backends.max_speaker_bytes_per_second = 1 << 30;
    let proxy = Proxy::start(s).await;
    // A caller that reads slowly: a tiny receive window, so the proxy's writes back up.
    let ws = slow_reading_socket(proxy.addr, &proxy.ws_url(), 2048).await;
    let mut call = TwilioCall::from_socket(ws, "clear").await;
    call.start(&[("backendIds", "agent")]).await;
    agent.wait_for_start(1).await;
    // More than the kernel's socket buffers hold (several MB), so that whatever they do not
    // take waits in the proxy's queue (30 s of audio at most: older frames are dropped).
    let backlog = 12_000;
    for i in 0..backlog {
        agent.say_text(twilio_media(&sized_payload(i, 400)));
    }
    let m = proxy.metrics().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    // Wait until the proxy's queue overflows: the socket took all it would.
    loop {
        let m = proxy.metrics().await;
        let dropped = metric(
            &m,
            r#"call_proxy_talkback_frames_dropped_total{backend="agent"}"#,
        )
        .unwrap_or(0.0);
        if dropped > 0.0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue never filled: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(m);
    agent.say_text(r#"{"event":"clear","streamSid":"MZagent"}"#);
    agent.say_text(twilio_media(&payload(9999)));
    let heard = caller_hears(&mut call, "the frame after the clear", |m| {
        media_payloads(m).contains(&payload(9999))
    })
    .await;
    let clear_at = heard
        .iter()
        .position(|m| m["event"] == "clear")
        .expect("a clear");
    let before = media_payloads(&heard[..clear_at]);
    let after = media_payloads(&heard[clear_at..]);
    assert_eq!(
        after,
        [payload(9999)],
        "only what was said after the clear follows it"
    );
    let sent: Vec<String> = (0..backlog).map(|i| sized_payload(i, 400)).collect();
    let mut at = 0;
    for p in &before {
        at += sent[at..]
            .iter()
            .position(|s| s == p)
            .expect("played in order, none twice")
            + 1;
    }
    let m = proxy.metrics().await;
    let cleared = metric(
        &m,
        r#"call_proxy_talkback_frames_cleared_total{backend="agent"}"#,
    )
    .unwrap();
    let dropped = metric(
        &m,
        r#"call_proxy_talkback_frames_dropped_total{backend="agent"}"#,
    )
    .unwrap();
    assert!(
        cleared > 100.0,
        "the clear found a backlog to discard: {cleared}"
    );
    assert_eq!(
        before.len() + cleared as usize + dropped as usize,
        backlog,
        "every frame played, cleared or dropped (and counted)"
    );
}

#[tokio::test]
async fn bad_messages_from_a_speaker_are_dropped_and_counted_and_the_call_goes_on() {
    let (agent, mut rec, proxy, mut call) = agent_and_recorder("bad").await;
    agent.say_text("this is not JSON");
    agent.say_text(r#"{"event":"media","media":{"payload":"*** not base64 ***"}}"#);
    agent.say_text(twilio_media(&"A".repeat(1 << 20)));
    // Larger than any message a listener may send, within a second's budget of a speaker's.
    agent.say_text(twilio_media(&"A".repeat(3 << 20)));
    agent.say(Message::Binary(vec![0u8; 320].into()));
    agent.say_text(r#"{"event":"media","media":{"payload":42}}"#);
    agent.say_text(twilio_media(&payload(7)));
    let heard = caller_hears(&mut call, "the good frame", |m| {
        !media_payloads(m).is_empty()
    })
    .await;
    assert_eq!(media_payloads(&heard), [payload(7)], "only the good one");
    // The call and its other backend carry on.
    for i in 0..10 {
        call.media(&payload(i)).await;
    }
    call.stop().await;
    rec.wait_for_stop().await;
    assert_eq!(payloads(&rec.texts()).len(), 10);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_backend_rejected_messages_total{backend="agent"}"#
        ),
        Some(6.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_backend_reconnects_total{backend="agent"}"#
        ),
        Some(0.0),
        "dropped messages, not a dropped link"
    );
}

#[tokio::test]
async fn a_speaker_that_reconnects_mid_call_goes_on_talking() {
    let mut agent = TalkingBackend::start().await;
    let proxy = Proxy::start(talking(
        &[("agent", &agent.url(), WireFormat::Twilio)],
        &["agent"],
    ))
    .await;
    let mut call = TwilioCall::connect(&proxy, "recon").await;
    call.start(&[("backendIds", "agent")]).await;
    agent.wait_for_start(1).await;
    agent.say_text(twilio_media(&payload(1)));
    caller_hears(&mut call, "before", |m| media_payloads(m) == [payload(1)]).await;
    agent.hang_up();
    call.media(&payload(0)).await;
    agent.wait_for_start(2).await;
    agent.say_text(twilio_media(&payload(2)));
    caller_hears(&mut call, "after the reconnect", |m| {
        media_payloads(m) == [payload(2)]
    })
    .await;
    call.stop().await;
}

#[tokio::test]
async fn a_listener_that_floods_is_disconnected_and_the_call_goes_on() {
    let mut flooder = TalkingBackend::start().await;
    let mut rec = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(talking(
        &[
            ("flooder", &flooder.url(), WireFormat::Twilio),
            ("rec", &rec.url(), WireFormat::Twilio),
        ],
        &[],
    ))
    .await;
    let mut call = TwilioCall::connect(&proxy, "flood").await;
    call.start(&[("backendIds", "flooder,rec")]).await;
    flooder.wait_for_start(1).await;
    for _ in 0..1000 {
        flooder.say_text(r#"{"event":"media","media":{"payload":"AAAA"}}"#);
    }
    for i in 0..50 {
        call.media(&payload(i)).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    flooder.wait_for_start(2).await;
    call.stop().await;
    rec.wait_for_stop().await;
    assert_eq!(
        payloads(&rec.texts()).len(),
        50,
        "the other backend lost nothing"
    );
    let m = proxy.metrics().await;
    assert!(
        metric(
            &m,
            r#"call_proxy_backend_misbehaving_total{backend="flooder"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
}

// ---- pcm16 -------------------------------------------------------------------------------

fn middle(samples: &[i16]) -> &[i16] {
    &samples[samples.len() / 4..samples.len() * 3 / 4]
}

#[tokio::test]
async fn pcm16_carries_a_tone_both_ways_at_every_rate() {
    for rate in [8000u32, 16000, 24000] {
        let mut agent = TalkingBackend::start().await;
        let mut s = talking(&[("agent", &agent.url(), WireFormat::Pcm16)], &["agent"]);
        s.backends.table.get_mut("agent").unwrap().sample_rate = Some(rate);
        s.validate().unwrap();
        let proxy = Proxy::start(s).await;
        let mut call = TwilioCall::connect(&proxy, &format!("pcm{rate}")).await;
        call.start(&[("backendIds", "agent")]).await;
        agent.wait_for_start(1).await;
        let start: Value = serde_json::from_str(&agent.texts()[0]).unwrap();
        assert_eq!(
            start["start"]["mediaFormat"],
            serde_json::json!({"encoding": "audio/l16", "sampleRate": rate, "channels": 1})
        );

        // Down: one second of a 1 kHz tone from the caller, as Twilio's mu-law frames.
        let caller_tone = tone(8000, 1000.0, 0.5, 8000);
        let codes: Vec<u8> = caller_tone.iter().map(|&s| mulaw::encode(s)).collect();
        for frame in codes.chunks(160) {
            call.media(&B64.encode(frame)).await;
        }
        call.send_text(
            r#"{"event":"dtmf","streamSid":"MZx","sequenceNumber":"60","dtmf":{"track":"inbound_track","digit":"9"}}"#.into(),
        )
        .await;
        agent
            .wait_for("the dtmf, after the audio", |log| {
                log.iter()
                    .any(|(_, m)| m.to_text().is_ok_and(|t| t.contains(r#""digit":"9""#)))
            })
            .await;
        let pcm = agent.binary();
        let got: Vec<i16> = pcm
            .chunks(2)
            .map(|p| i16::from_le_bytes([p[0], p[1]]))
            .collect();
        if rate == 8000 {
            let expected: Vec<i16> = codes.iter().map(|&c| mulaw::decode(c)).collect();
            assert_eq!(got, expected, "at 8 kHz exactly the G.711 decode");
        } else {
            assert!(
                got.len() as f64 > 0.9 * f64::from(rate),
                "{rate}: {} samples",
                got.len()
            );
            let settled = middle(&got);
            let wanted = level(settled, rate, 1000.0);
            assert!(
                db(wanted / 0.5).abs() < 1.0,
                "{rate}: tone at {:.2} dB",
                db(wanted / 0.5)
            );
            for image in [7000.0, 9000.0] {
                if image < f64::from(rate) / 2.0 {
                    let got = level(settled, rate, image);
                    assert!(
                        db(got / wanted) < -40.0,
                        "{rate}: image at {image} Hz {:.1} dB",
                        db(got / wanted)
                    );
                }
            }
        }

        // Up: the agent answers with a 1 kHz tone and a 6 kHz one (too high for the phone),
        // at its own rate, in frames of odd sizes.
        for (freq, what) in [(1000.0, "kept"), (6000.0, "filtered")] {
            if freq >= f64::from(rate) / 2.0 {
                continue;
            }
            let answer = tone(rate, freq, 0.5, rate as usize);
            for piece in answer.chunks(rate as usize / 50 + 7) {
                let bytes: Vec<u8> = piece.iter().flat_map(|s| s.to_le_bytes()).collect();
                agent.say(Message::Binary(bytes.into()));
            }
            let expected = 8000 * 9 / 10;
            let heard = caller_hears(&mut call, "the answer", |m| {
                media_payloads(m)
                    .iter()
                    .map(|p| B64.decode(p).unwrap().len())
                    .sum::<usize>()
                    >= expected
            })
            .await;
            let codes: Vec<u8> = media_payloads(&heard)
                .iter()
                .flat_map(|p| B64.decode(p).unwrap())
                .collect();
            let samples: Vec<i16> = codes.iter().map(|&c| mulaw::decode(c)).collect();
            let settled = middle(&samples);
            if what == "kept" {
                let got = level(settled, 8000, 1000.0);
                assert!(
                    db(got / 0.5).abs() < 1.0,
                    "{rate} up: tone at {:.2} dB",
                    db(got / 0.5)
                );
            } else {
                // Folded, 6 kHz would land on 2 kHz.
                let folded = level(settled, 8000, 2000.0);
                assert!(
                    db(folded / 0.5) < -40.0,
                    "{rate} up: 6 kHz folded to {:.1} dB",
                    db(folded / 0.5)
                );
            }
        }
        call.stop().await;
    }
}

#[tokio::test]
async fn dtmf_reaches_every_format_and_compact_speakers_talk_their_way() {
    let mut twilio = Backend::start(Behaviour::Normal).await;
    let mut compact = TalkingBackend::start().await;
    let mut pcm = TalkingBackend::start().await;
    let proxy = Proxy::start(talking(
        &[
            ("tw", &twilio.url(), WireFormat::Twilio),
            ("co", &compact.url(), WireFormat::Compact),
            ("pc", &pcm.url(), WireFormat::Pcm16),
        ],
        &["co"],
    ))
    .await;
    let mut call = TwilioCall::connect(&proxy, "dtmf").await;
    call.start(&[("backendIds", "tw,co,pc")]).await;
    compact.wait_for_start(1).await;
    pcm.wait_for_start(1).await;
    call.send_text(
        r#"{"event":"dtmf","streamSid":"MZdtmf","sequenceNumber":"2","dtmf":{"track":"inbound_track","digit":"5"}}"#.into(),
    )
    .await;
    compact
        .wait_for("compact dtmf", |log| {
            log.iter().any(|(_, m)| {
                m.to_text()
                    .is_ok_and(|t| t == r#"{"event":"dtmf","dtmf":"5"}"#)
            })
        })
        .await;
    pcm.wait_for("pcm16 dtmf", |log| {
        log.iter()
            .any(|(_, m)| m.to_text().is_ok_and(|t| t.contains(r#""digit":"5""#)))
    })
    .await;
    twilio
        .wait_for("twilio dtmf", |log| {
            texts(log).iter().any(|t| event(t) == "dtmf")
        })
        .await;

    compact.say_text(r#"{"event":"media","media":"AAEC"}"#);
    compact.say_text(r#"{"event":"mark","name":"m1"}"#);
    let heard = caller_hears(&mut call, "compact's words", |m| {
        m.iter().any(|m| m["event"] == "mark")
    })
    .await;
    assert_eq!(media_payloads(&heard), ["AAEC"]);
    call.send_text(
        r#"{"event":"mark","sequenceNumber":"3","streamSid":"MZdtmf","mark":{"name":"m1"}}"#.into(),
    )
    .await;
    compact
        .wait_for("the echo in compact form", |log| {
            log.iter().any(|(_, m)| {
                m.to_text()
                    .is_ok_and(|t| t == r#"{"event":"mark","name":"m1"}"#)
            })
        })
        .await;
    call.stop().await;
}

/// The original service's own test client: `tracks` as a string, counters as numbers and
/// words, and a whole WAV file as one `media` payload. A compact backend gets the audio in it,
/// a Twilio-format one the messages as sent.
#[tokio::test]
async fn the_originals_test_client_works_through_the_proxy() {
    let mut compact = Backend::start(Behaviour::Normal).await;
    let mut twilio = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[
        ("co", &compact.url(), WireFormat::Compact),
        ("tw", &twilio.url(), WireFormat::Twilio),
    ]))
    .await;
    let audio: Vec<u8> = (0..1600u32).map(|i| (i * 7 % 256) as u8).collect();
    let file = call_proxy::audio::wav::mulaw_file(&audio);

    let mut call = TwilioCall::connect(&proxy, "orig").await;
    call.send_text(
        r#"{"event":"start","start":{"streamSid":"MZorig","callSid":"CAorig","tracks":"inbound","customParameters":{"backendIds":"co,tw"}},"streamSid":"MZorig"}"#.into(),
    )
    .await;
    let media = format!(
        r#"{{"event":"media","sequenceNumber":2,"media":{{"track":"inbound","chunk":1,"timestamp":"now","payload":"{}"}},"streamSid":"MZorig"}}"#,
        B64.encode(&file)
    );
    call.send_text(media.clone()).await;
    call.stop().await;
    compact.wait_for_stop().await;
    twilio.wait_for_stop().await;
    let got = payloads(&compact.texts());
    assert_eq!(got.len(), 1);
    assert_eq!(
        B64.decode(&got[0]).unwrap(),
        audio,
        "the WAV's audio, header stripped"
    );
    assert!(twilio.texts().contains(&media), "the message as sent");
}

/// Backends at the same pcm16 rate share one resampler: they get the same bytes, frame for
/// frame; a backend at another rate gets its own.
#[tokio::test]
async fn pcm16_backends_at_one_rate_get_the_same_frames() {
    let mut a = TalkingBackend::start().await;
    let mut b = TalkingBackend::start().await;
    let mut c = TalkingBackend::start().await;
    let mut s = settings(&[
        ("a", &a.url(), WireFormat::Pcm16),
        ("b", &b.url(), WireFormat::Pcm16),
        ("c", &c.url(), WireFormat::Pcm16),
    ]);
    s.backends.table.get_mut("c").unwrap().sample_rate = Some(24000);
    s.validate().unwrap();
    let proxy = Proxy::start(s).await;
    let mut call = TwilioCall::connect(&proxy, "shared").await;
    call.start(&[("backendIds", "a,b,c")]).await;
    let codes: Vec<u8> = tone(8000, 440.0, 0.5, 8000)
        .iter()
        .map(|&s| mulaw::encode(s))
        .collect();
    for frame in codes.chunks(160) {
        call.media(&B64.encode(frame)).await;
    }
    call.stop().await;
    for backend in [&mut a, &mut b, &mut c] {
        backend
            .wait_for("stop", |log| {
                log.iter()
                    .any(|(_, m)| m.to_text().is_ok_and(|t| t.contains(r#""event":"stop""#)))
            })
            .await;
    }
    let (fa, fb, fc) = (a.binary_frames(), b.binary_frames(), c.binary_frames());
    assert!(fa.len() >= 45, "{} frames", fa.len());
    assert!(fa == fb, "one rate, the same frames");
    assert!(
        fa.len().abs_diff(fc.len()) <= 2,
        "a frame per 20 ms at each rate: {} and {}",
        fa.len(),
        fc.len()
    );
    let (bytes_a, bytes_c) = (a.binary().len() as f64, c.binary().len() as f64);
    assert!(
        (bytes_c / bytes_a - 1.5).abs() < 0.05,
        "24 kHz is half as much again as 16 kHz: {bytes_c} vs {bytes_a}"
    );
}
