//! `GET /v1/events`: the cluster's event stream as Server-Sent Events (see [`cloudai_control::events`]).
//!
//! A client gets the retained events after `Last-Event-ID` (or `after`) from the store, then
//! the live ones from this replica's [`EventHub`]; ids only grow along one stream. A client
//! that falls behind the fan-out reads what it missed from the store again, so it never
//! silently loses an event.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use utoipa::ToSchema;

use super::AppState;
use super::auth::Principal;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{truncate_for_message, validate_id};
use crate::event_log::{EventHub, TOPICS};
use crate::store::StoredEvent;

/// Comment frames this often keep idle connections (and proxies) open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Events one backlog read takes.
const BACKLOG_PAGE: u32 = 256;

/// Frames queued for one client before its producer waits.
const CLIENT_BUFFER: usize = 256;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/events", get(stream_events))
}

/// Who sees what, and which events were asked for.
#[derive(Debug, Clone)]
struct Filter {
    topics: Vec<String>,
    task_id: Option<String>,
    worker_id: Option<String>,
    /// `None` for an admin: everything.
    user: Option<String>,
}

impl Filter {
    fn passes(&self, e: &StoredEvent) -> bool {
        let e = &e.event;
        if !self.topics.contains(&e.topic) {
            return false;
        }
        if self.task_id.is_some() && e.task_id != self.task_id {
            return false;
        }
        if self.worker_id.is_some() && e.worker_id != self.worker_id {
            return false;
        }
        match (&self.user, e.topic.as_str()) {
            (None, _) => true,
            (Some(user), "task") => e.user_id.as_deref() == Some(user.as_str()),
            (Some(_), topic) => topic == "worker" || topic == "policy",
        }
    }
}

/// An event id: a whole number up to 2^63 - 1 (the document's `int64`).
fn parse_position(what: &str, raw: &str) -> ApiResult<u64> {
    raw.trim()
        .parse::<i64>()
        .ok()
        .and_then(|id| u64::try_from(id).ok())
        .ok_or_else(|| {
            ApiError::validation(format!(
                "{what} '{}' must be an event id (a whole number, at most 2^63 - 1)",
                truncate_for_message(raw)
            ))
        })
}

/// The stream of events: every retained event after `Last-Event-ID` (or `after`), then the
/// live ones. Frames: `id`, `event: <topic>.<kind>`, `data` (JSON); `event: reset` first when
/// the position asked for was pruned; `: keep-alive` comments every 15 s.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    security(("bearer" = [])),
    params(
        ("topics" = Option<String>, Query, description = "Comma list of task, worker, policy, reconciler, without spaces (default all)",
            pattern = "^(task|worker|policy|reconciler)(,(task|worker|policy|reconciler))*$"),
        ("task_id" = Option<String>, Query, description = "Only the events of this task",
            min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._-]{1,128}$"),
        ("worker_id" = Option<String>, Query, description = "Only the events of this worker",
            min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._-]{1,128}$"),
        ("after" = Option<u64>, Query, description = "Start after this event id (the `Last-Event-ID` header wins)",
            minimum = 0, maximum = 9223372036854775807_u64),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id",
            minimum = 0, maximum = 9223372036854775807_u64),
    ),
    responses(
        (status = 200, description = "Server-Sent Events", content_type = "text/event-stream", body = String),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not a user or admin token", body = ErrorBody),
        (status = 422, description = "Unknown parameter, topic or bad id (`validation_failed`)", body = ErrorBody),
        (status = 503, description = "This host serves no event stream (`events_unavailable`)", body = ErrorBody),
    ))]
pub async fn stream_events(
    State(_state): State<AppState>,
    principal: Principal,
    hub: Option<Extension<Arc<EventHub>>>,
    headers: HeaderMap,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> ApiResult<Response> {
    let (caller, is_admin) = principal.require_user()?;
    let Query(params) = query.map_err(|e| ApiError::validation(e.body_text()))?;
    if let Some(unknown) = params
        .keys()
        .find(|k| !matches!(k.as_str(), "topics" | "task_id" | "worker_id" | "after"))
    {
        return Err(ApiError::validation(format!(
            "unknown query parameter '{}' (expected topics, task_id, worker_id, after)",
            truncate_for_message(unknown)
        )));
    }
    let topics = match params.get("topics") {
        None => TOPICS.iter().map(|t| t.to_string()).collect(),
        Some(list) => {
            let topics: Vec<String> = list.split(',').map(str::to_string).collect();
            if let Some(bad) = topics.iter().find(|t| !TOPICS.contains(&t.as_str())) {
                return Err(ApiError::validation(format!(
                    "unknown topic '{}' (expected a comma list of {})",
                    truncate_for_message(bad),
                    TOPICS.join(", ")
                )));
            }
            topics
        }
    };
    for key in ["task_id", "worker_id"] {
        if let Some(id) = params.get(key) {
            validate_id(id).map_err(|why| ApiError::validation(format!("{key} {why}")))?;
        }
    }
    let header = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::validation("Last-Event-ID must be an event id"))
                .and_then(|raw| parse_position("Last-Event-ID", raw))
        })
        .transpose()?;
    let after = params
        .get("after")
        .map(|raw| parse_position("after", raw))
        .transpose()?;
    let Some(Extension(hub)) = hub else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "events_unavailable",
            "this host serves no event stream",
        ));
    };
    let filter = Filter {
        topics,
        task_id: params.get("task_id").cloned(),
        worker_id: params.get("worker_id").cloned(),
        user: (!is_admin).then(|| caller.to_string()),
    };
    let (frames, receiver) = mpsc::channel(CLIENT_BUFFER);
    // Subscribed before the backlog is read, so that nothing falls between the two.
    let live = hub.subscribe();
    tokio::spawn(async move {
        let start = header.or(after);
        tokio::select! {
            () = produce(&hub, live, &filter, start, &frames) => {}
            () = frames.closed() => {}
        }
    });
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|frame| (Ok::<Event, Infallible>(frame), receiver))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
        .into_response())
}

/// The data of an event of `GET /v1/events` (documentation of `frame`'s JSON).
#[derive(Debug, Serialize, ToSchema)]
pub struct EventFrame {
    /// The event's id, as in the frame's `id` (a decimal number).
    #[schema(pattern = "^[0-9]+$")]
    pub id: String,
    #[schema(pattern = "^(?:task|worker|policy|reconciler)$")]
    pub topic: String,
    /// What happened: `submitted`, `state`, `preempted`, `registered`, `activated`, ... (the frame's `event`
    /// is `<topic>.<kind>`).
    pub kind: String,
    pub at: DateTime<Utc>,
    pub task_id: Option<String>,
    pub worker_id: Option<String>,
    /// The owner of the task, for task events.
    pub user_id: Option<String>,
    /// The event's details, by kind.
    pub data: serde_json::Map<String, serde_json::Value>,
}

/// The data of a `reset` event: the position asked for was pruned.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResetFrame {
    pub reason: String,
}

fn frame(e: &StoredEvent) -> Event {
    let data = json!({
        "id": e.id.to_string(),
        "topic": e.event.topic,
        "kind": e.event.kind,
        "at": e.event.at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "task_id": e.event.task_id,
        "worker_id": e.event.worker_id,
        "user_id": e.event.user_id,
        "data": e.event.data,
    });
    Event::default()
        .id(e.id.to_string())
        .event(format!("{}.{}", e.event.topic, e.event.kind))
        .data(data.to_string())
}

/// Feeds one client until it goes away (its frames channel closes) or the hub stops.
async fn produce(
    hub: &EventHub,
    mut live: broadcast::Receiver<Arc<StoredEvent>>,
    filter: &Filter,
    start: Option<u64>,
    frames: &mpsc::Sender<Event>,
) {
    let send = |e: &StoredEvent| {
        let frame = filter.passes(e).then(|| frame(e));
        async move {
            match frame {
                Some(frame) => frames.send(frame).await.is_ok(),
                None => true,
            }
        }
    };
    let mut last = match start {
        None => hub.watermark(),
        Some(after) => match hub.store().event_bounds().await {
            Ok(bounds) if after.saturating_add(1) < bounds.oldest => {
                let reset = Event::default().event("reset").data(
                    json!({"reason": format!(
                        "events after {after} are no longer retained; continuing from the oldest retained event ({})",
                        bounds.oldest
                    )})
                    .to_string(),
                );
                if frames.send(reset).await.is_err() {
                    return;
                }
                bounds.oldest - 1
            }
            Ok(_) => after,
            Err(error) => {
                tracing::warn!(%error, "reading the event bounds for a stream");
                return;
            }
        },
    };
    loop {
        // Backlog (or what a lagging client missed): from the store, up to the watermark.
        loop {
            let watermark = hub.watermark();
            if last >= watermark {
                break;
            }
            let page = match hub.store().events_after(last, BACKLOG_PAGE).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(%error, after = last, "reading events for a stream; closing it");
                    return;
                }
            };
            let full = page.len() == BACKLOG_PAGE as usize;
            for e in page.iter().take_while(|e| e.id <= watermark) {
                if !send(e).await {
                    return;
                }
                last = e.id;
            }
            if !full || page.last().is_some_and(|e| e.id > watermark) {
                // Nothing else is stored up to the watermark (the tailer skipped its gaps).
                last = last.max(watermark);
            }
        }
        match live.recv().await {
            Ok(e) if e.id > last => {
                if !send(&e).await {
                    return;
                }
                last = e.id;
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                crate::metrics::event_client_lagged();
                tracing::debug!(
                    missed,
                    "an event stream client lagged; reading from the store"
                );
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
