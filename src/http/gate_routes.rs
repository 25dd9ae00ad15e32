//! The caller-gate routes: `/validate-pin`, `/blocked-callers`, `/auth-attempts`. Shapes
//! follow the original service so its Studio Flow works unchanged.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde_json::{json, Value};

use super::rate_limit::{ClientIp, Limited};
use super::{ApiError, AppState};
use crate::clock::rfc3339;
use crate::gate::{CallerStatus, GateError, Limit, PinOutcome};
use crate::store::Block;

impl From<GateError> for ApiError {
    fn from(e: GateError) -> Self {
        match e {
            GateError::Store(e) => e.into(),
            GateError::Pins(e) => {
                tracing::error!(error = %e, "PIN check unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "PIN check unavailable; try again shortly",
                )
            }
        }
    }
}

/// A caller id from a path or body, checked as SPEC section 4 says (400 naming the field).
fn caller_id(raw: &str) -> Result<&str, ApiError> {
    let id = raw.trim();
    crate::gate::check_caller_id(id)
        .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, format!("callerId: {why}")))?;
    Ok(id)
}

fn block_json(block: &Block) -> Value {
    json!({
        "id": block.caller,
        "blockedOn": rfc3339(block.blocked_on),
        "expiresAt": block.expires_at.map(rfc3339),
        "reason": block.reason,
        "blocked": true,
    })
}

/// A JSON scalar as text: Studio sends digits unquoted when its template is unquoted.
fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// What `/validate-pin` is asked.
struct PinRequest {
    pin: String,
    caller: String,
    /// The call's sid, when the flow sends it: the route token is bound to it.
    call_sid: String,
}

/// `{"pin","callerId"[,"callSid"]}` from a JSON or form body.
fn pin_request(headers: &HeaderMap, body: &[u8]) -> Result<PinRequest, ApiError> {
    if super::is_form(headers) {
        let mut request = PinRequest {
            pin: String::new(),
            caller: String::new(),
            call_sid: String::new(),
        };
        for (k, v) in form_urlencoded::parse(body) {
            match k.as_ref() {
                "pin" => request.pin = v.trim().to_string(),
                "callerId" => request.caller = v.trim().to_string(),
                "callSid" | "CallSid" => request.call_sid = v.trim().to_string(),
                _ => {}
            }
        }
        return Ok(request);
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("body must be JSON or a form with pin and callerId: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "body must be an object with pin and callerId",
        ));
    }
    Ok(PinRequest {
        pin: text(v.get("pin")),
        caller: text(v.get("callerId")),
        call_sid: text(v.get("callSid").or_else(|| v.get("CallSid"))),
    })
}

pub async fn validate_pin(
    State(state): State<AppState>,
    Extension(ClientIp(client)): Extension<ClientIp>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Response> {
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()).into_response())?;
    let request = pin_request(&headers, &body).map_err(IntoResponse::into_response)?;
    if !request.caller.is_empty() {
        caller_id(&request.caller).map_err(IntoResponse::into_response)?;
    }
    if request.call_sid.len() > 64 || request.call_sid.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "callSid: at most 64 characters, no control characters",
        )
        .into_response());
    }
    let PinRequest {
        pin,
        caller,
        call_sid,
    } = request;
    if let Err(limited) = state.limits.check_caller(&caller) {
        state.metrics.limited("pin_per_caller");
        return Err(limited.into_response());
    }
    let outcome = state
        .gate
        .validate_pin(&caller, &pin, Some(call_sid.as_str()), client)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    let body = match outcome {
        PinOutcome::Granted { grant, route_token } => json!({
            "authenticated": true,
            // Strings holding JSON arrays: Studio passes them on as stream parameters.
            "backendIds": serde_json::to_string(&grant.backend_ids).unwrap_or_default(),
            "backendHosts": serde_json::to_string(&grant.backend_hosts).unwrap_or_default(),
            "routeToken": route_token,
        }),
        PinOutcome::Blocked => json!({ "authenticated": false, "blocked": true }),
        PinOutcome::Limited { retry_after, why } => {
            state.metrics.limited(match why {
                Limit::PerCall => "pin_checks_per_call",
                Limit::PerAddress => "pin_failures_per_ip",
            });
            return Err(Limited(retry_after).into_response());
        }
        PinOutcome::Wrong { attempts, blocked } => json!({
            "authenticated": false,
            "blocked": blocked,
            "attempts": { "id": caller, "attempts": attempts, "blocked": blocked },
        }),
    };
    Ok(Json(body).into_response())
}

/// The flow's "is this caller blocked?" question: 200 when blocked, 404 when not.
pub async fn caller_status(
    State(state): State<AppState>,
    Path(caller): Path<String>,
) -> Result<Response, ApiError> {
    let caller = caller_id(&caller)?;
    Ok(match state.gate.status(caller).await? {
        CallerStatus::Withheld if caller.trim().is_empty() => {
            Json(json!({ "blocked": true })).into_response()
        }
        CallerStatus::Withheld => {
            Json(json!({ "id": caller, "withheld": true, "blocked": true })).into_response()
        }
        CallerStatus::Blocked(block) => Json(block_json(&block)).into_response(),
        CallerStatus::Clear => (
            StatusCode::NOT_FOUND,
            Json(json!({ "id": caller, "blocked": false, "error": "caller is not blocked" })),
        )
            .into_response(),
    })
}

/// `/blocked-callers/` with nothing after it: the flow asking about an empty caller id.
pub async fn empty_caller_status() -> Json<Value> {
    Json(json!({ "blocked": true }))
}

pub async fn list_blocked(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let blocks = state.gate.blocks().await?;
    Ok(Json(
        json!({ "data": blocks.iter().map(block_json).collect::<Vec<_>>() }),
    ))
}

/// The original's debug routes answer only with `ENABLE_DEBUG_ROUTES`
/// (`security.enable_debug_routes`); otherwise they are not there.
fn debug_routes(state: &AppState) -> Result<(), ApiError> {
    if state.settings.security.enable_debug_routes {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no such route (debug routes are off: ENABLE_DEBUG_ROUTES)",
        ))
    }
}

/// The caller a debug route acts on, once debug routes are known to be on.
fn debug_caller<'a>(state: &AppState, caller: &'a str) -> Result<&'a str, ApiError> {
    debug_routes(state)?;
    let caller = caller_id(caller)?;
    if caller.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "callerId: empty"));
    }
    Ok(caller)
}

/// Debug route: blocks a caller by hand (201).
pub async fn block_caller(
    State(state): State<AppState>,
    Path(caller): Path<String>,
) -> Result<Response, ApiError> {
    let caller = debug_caller(&state, &caller)?;
    let block = state.gate.block(caller, "blocked by an operator").await?;
    Ok((StatusCode::CREATED, Json(block_json(&block))).into_response())
}

pub async fn unblock_caller(
    State(state): State<AppState>,
    Path(caller): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.gate.unblock(caller_id(&caller)?).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "caller is not blocked",
        ))
    }
}

/// Debug route: counts one failed attempt against a caller, as a wrong PIN would (blocking it
/// past the limit): 201 `{id, attempts, blocked}`.
pub async fn count_attempt(
    State(state): State<AppState>,
    Path(caller): Path<String>,
) -> Result<Response, ApiError> {
    let caller = debug_caller(&state, &caller)?;
    let (attempts, blocked) = state.gate.count_failure(caller).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": caller, "attempts": attempts, "blocked": blocked })),
    )
        .into_response())
}

pub async fn attempts(
    State(state): State<AppState>,
    Path(caller): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state.gate.attempts(caller_id(&caller)?).await? {
        Some(n) => Ok(Json(json!({ "attempts": n }))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no failed attempts for this caller",
        )),
    }
}
