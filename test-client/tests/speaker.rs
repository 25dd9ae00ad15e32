//! local-speaker understands every wire format and says what it heard.

use std::time::Duration;

use base64::Engine as _;
use futures_util::SinkExt;
use test_client::speaker::{self, CallSummary, Options};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

async fn start(
    record_dir: Option<std::path::PathBuf>,
) -> (String, mpsc::UnboundedReceiver<CallSummary>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let options = Options {
        path: "/media".into(),
        record_dir,
        play: false,
        speak: None,
    };
    tokio::spawn(speaker::serve(listener, options, move |s| {
        let _ = tx.send(s);
    }));
    (format!("ws://{addr}"), rx)
}

async fn send(url: &str, messages: Vec<Message>) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}/media"))
        .await
        .unwrap();
    for m in messages {
        ws.send(m).await.unwrap();
    }
    let _ = ws.close(None).await;
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn summary(rx: &mut mpsc::UnboundedReceiver<CallSummary>) -> CallSummary {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a summary")
        .unwrap()
}

#[tokio::test]
async fn twilio_format_gaps_are_missing_chunks_and_other_tracks_are_set_aside() {
    let (url, mut rx) = start(None).await;
    let media = |chunk: u32, track: &str| {
        Message::Text(
            format!(
                r#"{{"event":"media","media":{{"track":"{track}","chunk":"{chunk}","timestamp":"0","payload":"{}"}}}}"#,
                b64(&[0xff; 160])
            )
            .into(),
        )
    };
    send(
        &url,
        vec![
            Message::Text(
                r#"{"event":"start","start":{"callSid":"CA42","tracks":["inbound","outbound"]}}"#
                    .into(),
            ),
            media(1, "inbound"),
            media(2, "inbound"),
            media(1, "outbound"),
            media(5, "inbound"),
            Message::Text(r#"{"event":"mark","mark":{"name":"x"}}"#.into()),
            Message::Text(r#"{"event":"stop"}"#.into()),
        ],
    )
    .await;
    let s = summary(&mut rx).await;
    assert_eq!(s.id, "CA42");
    assert_eq!(s.format, "twilio");
    assert_eq!(
        (s.frames, s.gaps, s.other_track_frames, s.marks_and_dtmf),
        (3, 1, 1, 1)
    );
    assert!(s.stopped);
    assert!((s.seconds() - 0.06).abs() < 1e-9);
    assert!(s
        .to_string()
        .starts_with("call CA42: 3 frames, 0.06 s of audio, 1 gaps"));
}

#[tokio::test]
async fn compact_and_pcm16_are_decoded_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut rx) = start(Some(dir.path().to_path_buf())).await;
    send(
        &url,
        vec![
            Message::Text(r#"{"event":"start"}"#.into()),
            Message::Text(
                format!(
                    r#"{{"event":"media","media":"{}"}}"#,
                    b64(&[0x00, 0x80, 0xff])
                )
                .into(),
            ),
            Message::Text(r#"{"event":"stop"}"#.into()),
        ],
    )
    .await;
    let s = summary(&mut rx).await;
    assert_eq!(s.format, "compact");
    let mut r = hound::WavReader::open(s.recording.unwrap()).unwrap();
    let samples: Vec<i16> = r.samples::<i16>().map(Result::unwrap).collect();
    assert_eq!(samples, [-32124, 32124, 0]);

    let pcm: Vec<u8> = [1i16, -2, 300]
        .iter()
        .flat_map(|s| s.to_le_bytes())
        .collect();
    send(
        &url,
        vec![
            Message::Text(r#"{"event":"start","sampleRate":16000}"#.into()),
            Message::Binary(pcm.into()),
        ],
    )
    .await;
    let s = summary(&mut rx).await;
    assert_eq!(
        (s.format, s.sample_rate, s.stopped),
        ("pcm16", 16000, false)
    );
    let mut r = hound::WavReader::open(s.recording.unwrap()).unwrap();
    assert_eq!(r.spec().sample_rate, 16000);
    let samples: Vec<i16> = r.samples::<i16>().map(Result::unwrap).collect();
    assert_eq!(samples, [1, -2, 300]);
}

#[tokio::test]
async fn other_paths_are_not_found() {
    let (url, _rx) = start(None).await;
    match tokio_tungstenite::connect_async(format!("{url}/elsewhere")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected 404, got {other:?}"),
    }
}

/// A call a proxy hands from one instance to another comes on two connections that overlap:
/// the new one's `start` names the old stream (`handoffOf`), the old one's `stop` the new
/// (`handedOffTo`). `--record-dir` joins them into the call's one WAV, in the order heard.
#[tokio::test]
async fn a_handed_off_call_is_one_recording() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut rx) = start(Some(dir.path().to_path_buf())).await;
    let start = |stream: &str, params: &str| {
        Message::Text(format!(
            r#"{{"event":"start","sequenceNumber":"1","streamSid":"{stream}","start":{{"accountSid":"AC1","streamSid":"{stream}","callSid":"CAmoved","tracks":["inbound"],"customParameters":{{{params}}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}}}}"#
        ).into())
    };
    let media = |stream: &str, chunk: u32, code: u8| {
        Message::Text(
            format!(
                r#"{{"event":"media","streamSid":"{stream}","media":{{"track":"inbound","chunk":"{chunk}","timestamp":"{}","payload":"{}"}}}}"#,
                (chunk - 1) * 20,
                b64(&[code; 160])
            )
            .into(),
        )
    };
    let connect = || async {
        tokio_tungstenite::connect_async(format!("{url}/media"))
            .await
            .unwrap()
            .0
    };
    let mut old = connect().await;
    old.send(start("MZold", "")).await.unwrap();
    for chunk in 1..=3 {
        old.send(media("MZold", chunk, 0x10)).await.unwrap();
    }
    // The new connection opens before the old one stops, as a proxy's hand-off does.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut new = connect().await;
    new.send(start("MZnew", r#""handoffOf":"MZold""#))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    old.send(Message::Text(
        r#"{"event":"stop","sequenceNumber":"5","streamSid":"MZold","stop":{"accountSid":"AC1","callSid":"CAmoved","handedOffTo":"MZnew"}}"#.into(),
    ))
    .await
    .unwrap();
    let first = summary(&mut rx).await;
    for chunk in 1..=2 {
        new.send(media("MZnew", chunk, 0x20)).await.unwrap();
    }
    new.send(Message::Text(
        r#"{"event":"stop","sequenceNumber":"4","streamSid":"MZnew","stop":{"accountSid":"AC1","callSid":"CAmoved"}}"#.into(),
    ))
    .await
    .unwrap();
    let second = summary(&mut rx).await;
    assert_eq!(first.recording, second.recording, "one file");
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let mut r = hound::WavReader::open(second.recording.unwrap()).unwrap();
    let samples: Vec<i16> = r.samples::<i16>().map(Result::unwrap).collect();
    assert_eq!(samples.len(), 5 * 160, "both connections' audio");
    let old_sample = call_proxy::audio::mulaw::decode(0x10);
    let new_sample = call_proxy::audio::mulaw::decode(0x20);
    assert!(samples[..480].iter().all(|s| *s == old_sample));
    assert!(samples[480..].iter().all(|s| *s == new_sample));
}
