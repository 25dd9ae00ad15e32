//! Every HTTP request counted and timed under its route's pattern: the router's own name for
//! it (`/blocked-callers/{caller_id}`), never the path a client wrote, so the metrics' labels
//! are a fixed set; what no route matched counts as `unmatched`.

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;

/// Inside the router: hands the matched route's pattern out with the response, where
/// [`measure`] (outside, where no route is known yet) finds it.
pub(super) async fn tag_route(request: Request, next: Next) -> Response {
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let mut response = next.run(request).await;
    if let Some(matched) = matched {
        response.extensions_mut().insert(matched);
    }
    response
}

/// Outermost: times the whole answer (guards, rate limits and body reading included) and
/// counts it by route, method and status.
pub(super) async fn measure(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let began = std::time::Instant::now();
    let method = request.method().clone();
    let response = next.run(request).await;
    let route = response
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    state
        .metrics
        .http_answered(route, &method, response.status().as_u16(), began.elapsed());
    response
}
