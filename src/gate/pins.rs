//! Who a PIN lets through: a directory of keyed PIN hashes from config (the PINs themselves
//! are never stored), or the original's external HTTP service.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{GateSettings, PinProviderKind};
use crate::twilio::params::list_value;

/// What a good PIN opens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub backend_ids: Vec<String>,
    pub backend_hosts: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The external PIN service failed: the caller is answered 503, never let through.
    #[error("PIN service unavailable: {0}")]
    Unavailable(String),
}

/// The config line for a PIN: `"hmac-sha256:<hex>"`.
pub fn hash_pin(key: &str, pin: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(pin.trim().as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("hmac-sha256:{hex}")
}

pub enum PinProvider {
    Directory {
        key: String,
        pins: Vec<(String, Vec<String>)>,
    },
    Http {
        url: String,
        /// The `apiKey` header, when configured.
        api_key: Option<reqwest::header::HeaderValue>,
        client: reqwest::Client,
    },
}

#[derive(Serialize)]
struct ServiceRequest<'a> {
    pin: &'a str,
}

/// The original hook's answer. Lists may come as arrays or as JSON-array strings.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceAnswer {
    authenticated: bool,
    #[serde(default)]
    backend_ids: Option<serde_json::Value>,
    #[serde(default)]
    backend_hosts: Option<serde_json::Value>,
}

impl PinProvider {
    pub fn from_settings(settings: &GateSettings) -> Result<PinProvider, PinError> {
        Ok(match settings.pin_provider {
            PinProviderKind::Directory => PinProvider::Directory {
                key: settings.pin_key.expose().to_string(),
                pins: settings
                    .pins
                    .iter()
                    .map(|(h, ids)| (h.to_ascii_lowercase(), ids.clone()))
                    .collect(),
            },
            PinProviderKind::Http => PinProvider::Http {
                url: settings.pin_service_url.clone(),
                api_key: match settings.pin_service_api_key.expose() {
                    "" => None,
                    key => {
                        let mut value =
                            reqwest::header::HeaderValue::from_str(key).map_err(|_| {
                                PinError::Unavailable(
                                    "gate.pin_service_api_key is not a valid header value".into(),
                                )
                            })?;
                        value.set_sensitive(true);
                        Some(value)
                    }
                },
                client: reqwest::Client::builder()
                    .timeout(Duration::from_millis(settings.pin_service_timeout_ms))
                    .build()
                    .map_err(|e| PinError::Unavailable(e.to_string()))?,
            },
        })
    }

    /// `Ok(Some(grant))` for a good PIN, `Ok(None)` for a wrong one (for the PIN service:
    /// `authenticated: false`, or a 4xx answer). A 5xx, a timeout or no answer is an error:
    /// never a success, never counted.
    pub async fn check(&self, pin: &str) -> Result<Option<Grant>, PinError> {
        match self {
            PinProvider::Directory { key, pins } => {
                let presented = hash_pin(key, pin);
                // Every entry is compared, in constant time, so timing says nothing.
                let mut found = None;
                for (hash, ids) in pins {
                    if bool::from(hash.as_bytes().ct_eq(presented.as_bytes())) {
                        found = Some(ids);
                    }
                }
                Ok(found.map(|ids| Grant {
                    backend_ids: ids.clone(),
                    backend_hosts: Vec::new(),
                }))
            }
            PinProvider::Http {
                url,
                api_key,
                client,
            } => {
                let mut request = client.post(url).json(&ServiceRequest { pin });
                if let Some(key) = api_key {
                    request = request.header("apiKey", key.clone());
                }
                let response = request
                    .send()
                    .await
                    .map_err(|e| PinError::Unavailable(e.without_url().to_string()))?;
                // The original's service answers a wrong PIN with a 4xx: counted as one.
                if response.status().is_client_error() {
                    return Ok(None);
                }
                if !response.status().is_success() {
                    return Err(PinError::Unavailable(format!(
                        "it answered HTTP {}",
                        response.status()
                    )));
                }
                let answer: ServiceAnswer = response
                    .json()
                    .await
                    .map_err(|e| PinError::Unavailable(format!("unreadable answer: {e}")))?;
                Ok(answer.authenticated.then(|| Grant {
                    backend_ids: list_value(answer.backend_ids),
                    backend_hosts: list_value(answer.backend_hosts),
                }))
            }
        }
    }
}

/// The `[gate.pins]` line for a PIN, as `call-proxy hash-pin` prints it.
pub fn directory_line(key: &str, pin: &str, backends: &[String]) -> String {
    let list: Vec<String> = backends.iter().map(|id| format!("\"{id}\"")).collect();
    format!("\"{}\" = [{}]", hash_pin(key, pin), list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_directory_knows_hashes_not_pins() {
        let provider = PinProvider::Directory {
            key: "k".repeat(16),
            pins: vec![(hash_pin(&"k".repeat(16), "4321"), vec!["rec".into()])],
        };
        assert_eq!(
            provider.check("4321").await.unwrap(),
            Some(Grant {
                backend_ids: vec!["rec".into()],
                backend_hosts: vec![]
            })
        );
        assert_eq!(provider.check("4322").await.unwrap(), None);
        assert_eq!(provider.check("").await.unwrap(), None);
        assert_ne!(
            hash_pin("a-key-of-16-bytes", "1"),
            hash_pin("another-key-16-by", "1")
        );
        assert_eq!(
            directory_line("k", "1", &["a".into(), "b".into()]),
            format!("\"{}\" = [\"a\", \"b\"]", hash_pin("k", "1"))
        );
    }
}
