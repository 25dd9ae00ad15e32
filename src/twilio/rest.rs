//! Twilio's REST API, the two calls a live hand-off makes: start a one-way Media Stream on a
//! live call (`POST …/Calls/{CallSid}/Streams.json`) and stop one by its sid
//! (`POST …/Calls/{CallSid}/Streams/{Sid}.json` with `Status=stopped`). HTTP Basic auth with
//! the account sid and auth token, or an API key sid and secret.

use std::time::Duration;

use serde::Deserialize;

/// Twilio's own base URL; tests and regional set-ups give another.
pub const DEFAULT_BASE_URL: &str = "https://api.twilio.com";

/// Stream parameters a create may carry (`Parameter1` to `Parameter99`).
pub const MAX_PARAMETERS: usize = 99;

/// The largest answer read from the API (a stream resource is a few hundred bytes).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Who the requests are from.
#[derive(Clone)]
pub struct Credentials {
    pub account_sid: String,
    /// The account sid again, or an API key sid (`SK…`).
    pub username: String,
    /// The auth token, or the API key's secret.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("account_sid", &self.account_sid)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A new stream to start on a live call.
#[derive(Debug, Clone, Default)]
pub struct NewStream {
    /// The `wss://` URL Twilio connects to.
    pub url: String,
    pub name: Option<String>,
    /// `inbound_track`, `outbound_track` or `both_tracks`.
    pub track: Option<String>,
    pub status_callback: Option<String>,
    /// Custom parameters, as `start.customParameters` will carry them.
    pub parameters: Vec<(String, String)>,
}

/// A stream as the API describes it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct StreamResource {
    pub sid: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub status: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// The API answered with an error (Twilio's JSON: `code`, `message`).
    #[error("Twilio answered {status}{}: {message}", code.map(|c| format!(" (error {c})")).unwrap_or_default())]
    Refused {
        status: u16,
        code: Option<u64>,
        message: String,
    },
    #[error("Twilio's API could not be reached: {0}")]
    Unreachable(String),
    #[error("Twilio's answer was not understood: {0}")]
    Unreadable(String),
    #[error("a stream takes at most {MAX_PARAMETERS} parameters, {0} given")]
    TooManyParameters(usize),
}

/// The form fields of a stream create, named as Twilio documents them.
pub fn create_form(stream: &NewStream) -> Result<Vec<(String, String)>, RestError> {
    if stream.parameters.len() > MAX_PARAMETERS {
        return Err(RestError::TooManyParameters(stream.parameters.len()));
    }
    let mut form = vec![("Url".to_string(), stream.url.clone())];
    let optional = [
        ("Name", &stream.name),
        ("Track", &stream.track),
        ("StatusCallback", &stream.status_callback),
    ];
    for (field, value) in optional {
        if let Some(value) = value {
            form.push((field.to_string(), value.clone()));
        }
    }
    if stream.status_callback.is_some() {
        form.push(("StatusCallbackMethod".to_string(), "POST".to_string()));
    }
    for (i, (name, value)) in stream.parameters.iter().enumerate() {
        form.push((format!("Parameter{}.Name", i + 1), name.clone()));
        form.push((format!("Parameter{}.Value", i + 1), value.clone()));
    }
    Ok(form)
}

/// A client for one account.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    credentials: Credentials,
}

impl Client {
    /// Every request gives up after `timeout`.
    pub fn new(
        base: &str,
        credentials: Credentials,
        timeout: Duration,
    ) -> Result<Client, RestError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| RestError::Unreachable(e.to_string()))?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            credentials,
        })
    }

    fn streams_url(&self, call_sid: &str) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/Calls/{}/Streams",
            self.base,
            path_segment(&self.credentials.account_sid),
            path_segment(call_sid)
        )
    }

    /// Starts a one-way stream on the live call `call_sid`.
    pub async fn start_stream(
        &self,
        call_sid: &str,
        stream: &NewStream,
    ) -> Result<StreamResource, RestError> {
        let form = create_form(stream)?;
        let url = format!("{}.json", self.streams_url(call_sid));
        self.post(&url, &form).await
    }

    /// Stops the stream `sid` (or the stream named so) of the call `call_sid`.
    pub async fn stop_stream(
        &self,
        call_sid: &str,
        sid: &str,
    ) -> Result<StreamResource, RestError> {
        let url = format!("{}/{}.json", self.streams_url(call_sid), path_segment(sid));
        let form = [("Status".to_string(), "stopped".to_string())];
        self.post(&url, &form).await
    }

    async fn post(
        &self,
        url: &str,
        form: &[(String, String)],
    ) -> Result<StreamResource, RestError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut answer = self
            .http
            .post(url)
            .basic_auth(&self.credentials.username, Some(&self.credentials.password))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| RestError::Unreachable(without_url(e)))?;
        let status = answer.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = answer
            .chunk()
            .await
            .map_err(|e| RestError::Unreachable(without_url(e)))?
        {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(RestError::Unreadable("the answer is too large".into()));
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            #[derive(Deserialize)]
            struct Problem {
                code: Option<u64>,
                message: Option<String>,
            }
            let problem: Option<Problem> = serde_json::from_slice(&bytes).ok();
            return Err(RestError::Refused {
                status: status.as_u16(),
                code: problem.as_ref().and_then(|p| p.code),
                message: problem
                    .and_then(|p| p.message)
                    .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string()),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| RestError::Unreadable(e.to_string()))
    }
}

/// A sid as one path segment: anything but letters and digits is escaped, so no value can
/// reach another resource.
fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A client error without the URL it carries (which names the account and the call).
fn without_url(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    format!("{kind}: {}", e.without_url())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_create_form_names_fields_as_twilio_documents_them() {
        let stream = NewStream {
            url: "wss://proxy.example.com/media".into(),
            name: Some("handoff-1".into()),
            track: Some("inbound_track".into()),
            status_callback: Some("https://proxy.example.com/twilio/stream-status".into()),
            parameters: vec![
                ("callerId".into(), "+15550001111".into()),
                ("handoffOf".into(), "MZ1".into()),
            ],
        };
        let form = create_form(&stream).unwrap();
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("Url"), Some("wss://proxy.example.com/media"));
        assert_eq!(get("Name"), Some("handoff-1"));
        assert_eq!(get("Track"), Some("inbound_track"));
        assert_eq!(get("StatusCallbackMethod"), Some("POST"));
        assert_eq!(get("Parameter1.Name"), Some("callerId"));
        assert_eq!(get("Parameter1.Value"), Some("+15550001111"));
        assert_eq!(get("Parameter2.Name"), Some("handoffOf"));
        assert_eq!(get("Parameter2.Value"), Some("MZ1"));

        let too_many = NewStream {
            parameters: vec![("a".into(), "b".into()); MAX_PARAMETERS + 1],
            ..stream
        };
        assert!(matches!(
            create_form(&too_many),
            Err(RestError::TooManyParameters(100))
        ));
    }

    #[test]
    fn sids_cannot_leave_their_path_segment() {
        assert_eq!(path_segment("CA123abc"), "CA123abc");
        assert_eq!(path_segment("../Messages"), "%2E%2E%2FMessages");
        assert_eq!(path_segment("MZ1?x=1#"), "MZ1%3Fx%3D1%23");
    }

    #[test]
    fn credentials_never_show_their_secret() {
        let c = Credentials {
            account_sid: "AC1".into(),
            username: "SK1".into(),
            password: "very-secret".into(),
        };
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
