//! `flow-sample.json` is a Studio Flow this service can run behind: it parses, its wiring is
//! whole, and every URL in it reaches a route this service serves, with the answers the
//! flow branches on.

mod common;

use std::collections::HashSet;

use call_proxy::config::WireFormat;
use common::*;
use serde_json::Value;

fn flow() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("flow-sample.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON")
}

fn state<'a>(flow: &'a Value, name: &str) -> &'a Value {
    flow["states"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no state {name}"))
}

/// Fills the flow's Liquid variables the way Studio would for one call.
fn fill(template: &str, proxy: &Proxy) -> String {
    template
        .replace("https://{{flow.variables.proxy_host}}", &proxy.url(""))
        .replace(
            "wss://{{flow.variables.proxy_host}}",
            &format!("ws://{}", proxy.addr),
        )
        .replace("{{trigger.call.From}}", "+15557770000")
        // The call sid TwilioCall::connect(.., "flow") starts its stream with.
        .replace("{{trigger.call.CallSid}}", "CAflow")
        .replace("{{flow.sid}}", "FN0123456789abcdef0123456789abcdef")
        .replace("{{widgets.gather_pin.Digits}}", "1234")
}

#[test]
fn the_flow_is_wired_whole_in_studios_export_format() {
    let flow = flow();
    let states = flow["states"].as_array().expect("states");
    let names: HashSet<&str> = states.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), states.len(), "state names are unique");
    assert!(names.contains(flow["initial_state"].as_str().unwrap()));
    assert_eq!(flow["flags"]["allow_concurrent_calls"], true);
    let known = [
        "trigger",
        "set-variables",
        "make-http-request",
        "gather-input-on-call",
        "split-based-on",
        "say-play",
        "fork-stream",
    ];
    for s in states {
        assert!(
            known.contains(&s["type"].as_str().unwrap()),
            "{}",
            s["type"]
        );
        assert!(
            s["properties"]["offset"].is_object(),
            "{} has an offset",
            s["name"]
        );
        for t in s["transitions"].as_array().unwrap() {
            if let Some(next) = t["next"].as_str() {
                assert!(names.contains(next), "{} -> {next}", s["name"]);
            }
        }
    }
    let trigger = state(&flow, "Trigger");
    assert!(trigger["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["event"] == "incomingCall" && t["next"].is_string()));

    let fork = &state(&flow, "fork_stream")["properties"];
    assert_eq!(fork["stream_action"], "start");
    assert!(fork["stream_url"].as_str().unwrap().starts_with("wss://"));
    let params: Vec<(&str, &str)> = fork["stream_parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["key"].as_str().unwrap(), p["value"].as_str().unwrap()))
        .collect();
    for (key, value) in [
        ("backendIds", "{{widgets.validate_pin.parsed.backendIds}}"),
        (
            "backendHosts",
            "{{widgets.validate_pin.parsed.backendHosts}}",
        ),
        ("routeToken", "{{widgets.validate_pin.parsed.routeToken}}"),
        ("executionId", "{{flow.sid}}"),
    ] {
        assert!(params.contains(&(key, value)), "stream parameter {key}");
    }
}

#[tokio::test]
async fn every_url_in_the_flow_reaches_this_service() {
    let mut spk = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[("speaker", &spk.url(), WireFormat::Compact)]);
    add_pin(&mut s, "1234", &["speaker"]);
    let proxy = Proxy::start(s).await;
    let flow = flow();
    let client = reqwest::Client::new();

    let mut checked = 0;
    let mut pin_answer = Value::Null;
    for st in flow["states"].as_array().unwrap() {
        if st["type"] != "make-http-request" {
            continue;
        }
        let p = &st["properties"];
        let url = fill(p["url"].as_str().unwrap(), &proxy);
        let method = p["method"].as_str().unwrap();
        let mut request = client.request(method.parse().unwrap(), &url);
        if let Some(body) = p["body"].as_str() {
            request = request
                .header("content-type", p["content_type"].as_str().unwrap())
                .body(fill(body, &proxy));
        }
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_ne!(body["error"], "no such route", "{method} {url}");
        assert_ne!(status, 405, "{method} {url}");
        // The answers each branch of the flow expects from a fresh caller.
        match st["name"].as_str().unwrap() {
            "check_blocked" => assert_eq!(status, 404, "not blocked: the flow asks for the PIN"),
            "validate_pin" => {
                assert_eq!(status, 200);
                assert_eq!(body["authenticated"], true);
                pin_answer = body;
            }
            "check_connected" => assert_eq!(status, 410, "no live stream yet"),
            other => panic!("unexpected request widget {other}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 3);

    // The Fork Stream URL is the media endpoint.
    let fork = &state(&flow, "fork_stream")["properties"];
    let ws_url = fill(fork["stream_url"].as_str().unwrap(), &proxy);
    assert_eq!(ws_url, proxy.ws_url());
    // Started as the Fork Stream widget would, with the PIN's answer as parameters.
    let answer = |k: &str| pin_answer[k].as_str().unwrap().to_string();
    let (ids, hosts, token) = (
        answer("backendIds"),
        answer("backendHosts"),
        answer("routeToken"),
    );
    let mut call = TwilioCall::connect(&proxy, "flow").await;
    call.start(&[
        ("backendIds", ids.as_str()),
        ("backendHosts", hosts.as_str()),
        ("routeToken", token.as_str()),
        ("executionId", "FN0123456789abcdef0123456789abcdef"),
        ("callerId", "+15557770000"),
    ])
    .await;
    call.media(&payload(0)).await;
    spk.wait_for("a frame", |log| payloads(&texts(log)).len() == 1)
        .await;
    let url = fill(
        state(&flow, "check_connected")["properties"]["url"]
            .as_str()
            .unwrap(),
        &proxy,
    );
    assert_eq!(
        reqwest::get(url).await.unwrap().status(),
        200,
        "live while streaming"
    );
}
