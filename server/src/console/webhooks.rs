//! The console's webhooks pages: every registered endpoint with its deliveries counted by
//! state, and one endpoint's recent deliveries with their attempts, where an operator sends a
//! dead-lettered delivery (or all of them, or one delivered event) again. Secrets are never
//! shown: an endpoint's signing secret is answered once, by the API that registers it.

use super::{ConsoleError, Layout, Operator, Posted, render, when, when_opt};
use crate::AppState;
use crate::error::ApiError;
use crate::extract::QueryParams;
use crate::webhooks::{self, Delivery, DeliveryState};
use askama::Template;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use uuid::Uuid;

/// Most deliveries one endpoint's page lists.
const PAGE_DELIVERIES: i64 = 100;

/// An endpoint as the list shows it.
struct EndpointRow {
    id: String,
    url: String,
    events: String,
    created: String,
    pending: i64,
    delivered: i64,
    dead: i64,
}

#[derive(Template)]
#[template(path = "console/webhooks.html")]
struct ListPage {
    layout: Layout,
    endpoints: Vec<EndpointRow>,
}

/// `GET /console/webhooks`: the endpoints, oldest first, with their deliveries by state.
pub async fn list(State(state): State<AppState>, op: Operator) -> Result<Response, ConsoleError> {
    let client = state.pool.get().await?;
    let counts = webhooks::delivery_counts(&client).await?;
    let endpoints = webhooks::endpoints(&client)
        .await?
        .into_iter()
        .map(|e| {
            let [pending, delivered, dead] = counts.get(&e.id).copied().unwrap_or_default();
            EndpointRow {
                id: e.id.to_string(),
                url: e.url,
                events: e.events.join(", "),
                created: when(e.created_at),
                pending,
                delivered,
                dead,
            }
        })
        .collect();
    render(&ListPage { layout: Layout::new(&op, "/console/webhooks"), endpoints })
}

/// One attempt as a delivery's log shows it.
struct AttemptRow {
    attempt: i32,
    started: String,
    duration_ms: i32,
    outcome: String,
}

/// A delivery as an endpoint's page shows it.
struct DeliveryRow {
    event_id: String,
    kind: String,
    created: String,
    state: &'static str,
    attempts: i32,
    next_attempt: String,
    delivered: String,
    last: String,
    log: Vec<AttemptRow>,
}

/// What an attempt (or a delivery's last attempt) came to, in a few words.
fn outcome(status: Option<i32>, error: Option<&str>) -> String {
    match (status, error) {
        (Some(s), Some(e)) => format!("{s}: {e}"),
        (Some(s), None) => s.to_string(),
        (None, Some(e)) => e.to_string(),
        (None, None) => "—".to_string(),
    }
}

impl DeliveryRow {
    fn of(d: Delivery) -> DeliveryRow {
        DeliveryRow {
            event_id: d.event_id.to_string(),
            kind: d.kind,
            created: when(d.created_at),
            state: d.state.as_str(),
            attempts: d.attempts,
            next_attempt: when_opt(d.next_attempt_at),
            delivered: when_opt(d.delivered_at),
            last: outcome(d.last_status, d.last_error.as_deref()),
            log: d
                .attempt_log
                .into_iter()
                .map(|a| AttemptRow {
                    attempt: a.attempt,
                    started: a.started_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                    duration_ms: a.duration_ms,
                    outcome: outcome(a.status, a.error.as_deref()),
                })
                .collect(),
        }
    }
}

/// One state filter link of an endpoint's page.
struct StateLink {
    name: &'static str,
    active: bool,
}

#[derive(Template)]
#[template(path = "console/webhook.html")]
struct EndpointPage {
    layout: Layout,
    id: String,
    url: String,
    events: String,
    created: String,
    filter: &'static str,
    states: Vec<StateLink>,
    dead: i64,
    deliveries: Vec<DeliveryRow>,
}

/// Query of an endpoint's page.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesFilter {
    /// Only deliveries in this state (`pending`, `delivered`, `dead`); empty or absent: all.
    #[serde(default)]
    pub state: String,
}

/// `GET /console/webhooks/{id}?state=`: the endpoint and its newest deliveries with their
/// attempts, each with a replay button, and one button replaying every dead letter.
pub async fn show(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<DeliveriesFilter>,
) -> Result<Response, ConsoleError> {
    let id = webhooks::endpoint_id(&id)?;
    let wanted = match q.state.trim() {
        "" => None,
        s => Some(DeliveryState::parse(s)?),
    };
    let client = state.pool.get().await?;
    let ep = webhooks::endpoint(&client, id).await?;
    let deliveries = webhooks::recent_deliveries(&client, id, wanted, PAGE_DELIVERIES).await?;
    let dead = webhooks::delivery_counts(&client).await?.get(&id).map_or(0, |c| c[2]);
    render(&EndpointPage {
        layout: Layout::new(&op, "/console/webhooks"),
        id: ep.id.to_string(),
        url: ep.url,
        events: ep.events.join(", "),
        created: when(ep.created_at),
        filter: wanted.map_or("", DeliveryState::as_str),
        states: DeliveryState::ALL.iter().map(|s| StateLink { name: s.as_str(), active: Some(*s) == wanted }).collect(),
        dead,
        deliveries: deliveries.into_iter().map(DeliveryRow::of).collect(),
    })
}

/// Form of a replay: one event, or (empty) every dead-lettered delivery.
#[derive(Debug, Deserialize)]
pub struct ReplayForm {
    /// The event to send again; empty: every dead letter.
    #[serde(default)]
    pub event_id: String,
}

/// `POST /console/webhooks/{id}/replay`: queues one event's delivery, or every dead letter,
/// again (as `POST /v1/admin/webhooks/{id}/replay` does); back to the endpoint's page.
pub async fn replay(State(state): State<AppState>, Path(id): Path<String>, posted: Posted<ReplayForm>) -> Result<Response, ConsoleError> {
    let id = webhooks::endpoint_id(&id)?;
    let event = match posted.form.event_id.trim() {
        "" => None,
        e => Some(Uuid::parse_str(e).map_err(|_| ApiError::Invalid("invalid_request", "event_id must be an event id (a UUID)".into()))?),
    };
    let client = state.pool.get().await?;
    let n = webhooks::requeue(&client, id, event, state.now()).await?;
    tracing::info!(endpoint_id = %id, event_id = ?event, replayed = n, by = %posted.op.admin.actor(), "webhook deliveries replayed from the console");
    Ok(Redirect::to(&format!("/console/webhooks/{id}")).into_response())
}
