//! The console's user pages: the search (by email, subject or id), a user's page (plan and
//! access reason, subscriptions per store, credits, access grants with who granted them,
//! devices with their last sync and leases, the usage chart), and granting and revoking access.

use super::chart::{self, Chart};
use super::{ConsoleError, Layout, Operator, Posted, render, when, when_opt};
use crate::error::ApiError;
use crate::extract::QueryParams;
use crate::grants::{self, AccessGrantRequest};
use crate::usage::{self, Group};
use crate::users::{self, User};
use crate::{AppState, billing, entitlements, leases};
use askama::Template;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use uuid::Uuid;

/// Most users a search lists.
const SEARCH_LIMIT: i64 = 50;

/// A user as a list shows it.
struct UserRow {
    id: String,
    subject: String,
    email: String,
    name: String,
    created: String,
    admin: bool,
    disabled: bool,
}

impl UserRow {
    fn of(u: &User) -> UserRow {
        UserRow {
            id: u.user_id.to_string(),
            subject: u.external_id.clone().unwrap_or_default(),
            email: u.email.clone().unwrap_or_default(),
            name: u.display_name.clone().unwrap_or_default(),
            created: when(u.created_at),
            admin: u.is_admin,
            disabled: u.disabled_at.is_some(),
        }
    }
}

#[derive(Template)]
#[template(path = "console/users.html")]
struct SearchPage {
    layout: Layout,
    q: String,
    users: Vec<UserRow>,
    /// Addresses the canonical-email backfill took from rows (a notice while there are any).
    collisions: Vec<crate::email_canonical::Collision>,
}

/// Query of the search.
#[derive(Debug, Deserialize)]
pub struct SearchQuery {
    /// An email or subject (or their start), or a user id.
    #[serde(default)]
    pub q: String,
}

/// `GET /console/users?q=`: users whose email or subject starts with `q`, or of id `q`.
pub async fn search(
    State(state): State<AppState>,
    op: Operator,
    QueryParams(query): QueryParams<SearchQuery>,
) -> Result<Response, ConsoleError> {
    let client = state.pool.get().await?;
    let found = users::search(&client, &query.q, SEARCH_LIMIT, &state.config.admin_subjects).await?;
    let collisions = crate::email_canonical::collisions(&client).await?;
    render(&SearchPage {
        collisions,
        layout: Layout::new(&op, "/console/users"),
        q: query.q.trim().to_string(),
        users: found.iter().map(UserRow::of).collect(),
    })
}

struct SubRow {
    store: String,
    id: String,
    product: String,
    plan: String,
    status: String,
    period_end: String,
    renews: &'static str,
}

struct CreditRow {
    id: String,
    remaining: i64,
    expires: String,
    source: String,
}

struct GrantRow {
    id: String,
    plan: String,
    until: String,
    granted_by: String,
    reason: String,
    created: String,
    state: &'static str,
    active: bool,
}

struct LeaseRow {
    feature: String,
    period: String,
    allowance: u64,
    consumed: u64,
}

struct DeviceRow {
    id: String,
    last_sync: String,
    first_seen: String,
    protocol: i32,
    lease_until: String,
    state: &'static str,
    leases: Vec<LeaseRow>,
}

struct SpanLink {
    days: u32,
    active: bool,
}

#[derive(Template)]
#[template(path = "console/user.html")]
struct UserPage {
    layout: Layout,
    user: UserRow,
    timezone: String,
    plan: String,
    access_reason: String,
    status: String,
    granted_until: String,
    credit_balance: i64,
    credits: Vec<CreditRow>,
    subscriptions: Vec<SubRow>,
    grants: Vec<GrantRow>,
    devices: Vec<DeviceRow>,
    plans: Vec<String>,
    days: u32,
    spans: Vec<SpanLink>,
    chart_json: String,
    charted: Vec<String>,
    can_grant: bool,
}

/// Query of a user's page.
#[derive(Debug, Deserialize)]
pub struct UserQuery {
    /// Days of the chart: 30 (default) or 90.
    pub days: Option<u32>,
}

fn user_id(id: &str) -> Result<Uuid, ConsoleError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found("user").into())
}

/// The usage chart of `user` over `days` days at `now`.
pub async fn usage_chart(state: &AppState, user: &User, days: u32, now: DateTime<Utc>) -> Result<Chart, ApiError> {
    let client = state.pool.get().await?;
    let loaded = entitlements::load(state, &client, user, now).await?;
    let from = chart::start(days, loaded.zones.zone_at(now), now);
    let scope = usage::Scope { user_id: Some(user.user_id), from: Some(from), to: Some(now + chrono::Duration::days(1)) };
    let rows = usage::grouped(&client, scope, &[Group::Day, Group::Feature]).await?;
    Ok(chart::build(&rows, &loaded.ents.features, &loaded.zones, loaded.anchor, now, days))
}

/// `GET /console/users/{id}?days=30|90`: everything the server knows of one user's access and
/// usage.
pub async fn show(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<UserQuery>,
) -> Result<Response, ConsoleError> {
    let days = q.days.unwrap_or(chart::SPANS[0]);
    if !chart::SPANS.contains(&days) {
        return Err(ApiError::Invalid("invalid_query", format!("days must be one of {:?}", chart::SPANS)).into());
    }
    let uid = user_id(&id)?;
    let client = state.pool.get().await?;
    let user = users::by_id(&client, uid, &state.config.admin_subjects).await?.ok_or_else(|| ApiError::not_found("user"))?;
    let now = state.now();
    let loaded = entitlements::load(&state, &client, &user, now).await?;
    let ents = &loaded.ents;
    let subscriptions = billing::subscriptions::load(&client, uid)
        .await?
        .into_iter()
        .map(|s| SubRow {
            store: s.sub.store.as_str().to_string(),
            id: s.sub.subscription_id.clone(),
            product: s.sub.product_id.clone().unwrap_or_default(),
            plan: s.sub.plan.clone().unwrap_or_default(),
            status: s.sub.status.as_str().to_string(),
            period_end: when_opt(s.sub.period_end),
            renews: if s.sub.lifetime {
                "lifetime"
            } else if s.auto_renew {
                "yes"
            } else {
                "no"
            },
        })
        .collect();
    let grants = grants::list(&client, uid)
        .await?
        .into_iter()
        .map(|g| GrantRow {
            id: g.grant_id.to_string(),
            plan: g.plan.clone(),
            until: g.until.map_or_else(|| "no end".to_string(), when),
            granted_by: g.granted_by.clone(),
            reason: g.reason.clone(),
            created: when(g.created_at),
            state: if g.revoked_at.is_some() {
                "revoked"
            } else if g.active(now) {
                "active"
            } else {
                "ended"
            },
            active: g.active(now),
        })
        .collect();
    let devices = leases::devices(&client, uid)
        .await?
        .into_iter()
        .map(|d| DeviceRow {
            state: if d.removed_at.is_some() {
                "removed"
            } else if d.cloned {
                "cloned"
            } else {
                "active"
            },
            id: d.device_id,
            last_sync: when(d.last_sync_at),
            first_seen: when(d.first_seen_at),
            protocol: d.protocol,
            lease_until: when_opt(d.lease_until),
            leases: d
                .leases
                .into_iter()
                .map(|l| LeaseRow {
                    feature: l.feature,
                    period: l.period.as_str().to_string(),
                    allowance: l.allowance,
                    consumed: l.consumed,
                })
                .collect(),
        })
        .collect();
    drop(client);
    let chart = usage_chart(&state, &user, days, now).await?;
    let page = UserPage {
        layout: Layout::new(&op, "/console/users"),
        timezone: user.timezone.clone(),
        plan: ents.plan.clone(),
        access_reason: ents.access_reason.clone(),
        status: ents.status.as_str().to_string(),
        granted_until: when_opt(ents.granted_until),
        credit_balance: ents.credit_balance,
        credits: ents
            .credit_grants
            .iter()
            .map(|g| CreditRow { id: g.id.clone(), remaining: g.remaining, expires: when_opt(g.expires_at), source: g.source.clone() })
            .collect(),
        subscriptions,
        grants,
        devices,
        plans: loaded.catalog.plans.iter().map(|p| p.id.clone()).collect(),
        days,
        spans: chart::SPANS.iter().map(|&d| SpanLink { days: d, active: d == days }).collect(),
        charted: chart.features.iter().map(|f| f.feature.clone()).collect(),
        chart_json: serde_json::to_string(&chart).map_err(ApiError::internal)?,
        can_grant: user.external_id.is_some(),
        user: UserRow::of(&user),
    };
    render(&page)
}

/// The grant form's fields.
#[derive(Debug, Deserialize)]
pub struct GrantForm {
    /// Plan id.
    pub plan: String,
    /// Last day of the grant (`YYYY-MM-DD`, UTC; empty: no end): it ends at the next midnight.
    #[serde(default)]
    pub until: String,
    /// Why (`access_reason` becomes `granted:<reason>`).
    pub reason: String,
}

/// `POST /console/users/{id}/grants`: grants a plan as `POST /v1/admin/grants` does, granted by
/// the signed-in operator; back to the user's page.
pub async fn grant(State(state): State<AppState>, Path(id): Path<String>, posted: Posted<GrantForm>) -> Result<Response, ConsoleError> {
    let uid = user_id(&id)?;
    let form = posted.form;
    let until = match form.until.trim() {
        "" => None,
        day => {
            let d = NaiveDate::parse_from_str(day, "%Y-%m-%d")
                .map_err(|_| ApiError::Invalid("invalid_request", "until must be a date (YYYY-MM-DD)".into()))?;
            Some(tally_core::period::local_midnight(d + chrono::Duration::days(1), chrono_tz::UTC))
        }
    };
    let client = state.pool.get().await?;
    let user = users::by_id(&client, uid, &state.config.admin_subjects).await?.ok_or_else(|| ApiError::not_found("user"))?;
    drop(client);
    let subject = user.external_id.ok_or_else(|| {
        ApiError::Conflict("pending_user", "this user has not signed in yet (no subject): access can be granted once it has one".into())
    })?;
    let by = posted.op.admin.actor();
    let req = AccessGrantRequest { subject: &subject, plan: form.plan.trim(), until, granted_by: &by, reason: form.reason.trim() };
    grants::create(&state, &req).await?;
    tracing::info!(user_id = %uid, plan = %req.plan, granted_by = %by, "access granted from the console");
    Ok(Redirect::to(&format!("/console/users/{uid}")).into_response())
}

/// `POST /console/users/{id}/grants/{grant_id}/revoke`: revokes one access grant; back to the
/// user's page.
pub async fn revoke(
    State(state): State<AppState>,
    Path((id, grant_id)): Path<(String, String)>,
    posted: Posted<super::session::NoFields>,
) -> Result<Response, ConsoleError> {
    let uid = user_id(&id)?;
    let gid = Uuid::parse_str(&grant_id).map_err(|_| ApiError::not_found("grant"))?;
    grants::revoke(&state, uid, Some(gid)).await?;
    tracing::info!(user_id = %uid, grant_id = %gid, by = %posted.op.admin.actor(), "access grant revoked from the console");
    Ok(Redirect::to(&format!("/console/users/{uid}")).into_response())
}
