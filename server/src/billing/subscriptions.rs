//! The one subscription model on the server: every store's subscriptions of a user in
//! `store_subscriptions`, per (store, store subscription id), and the summary row of the one in
//! effect in `subscriptions`.

use crate::AppState;
use crate::error::ApiResult;
use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use tally_core::{Catalog, Store, Subscription, SubscriptionStatus};
use uuid::Uuid;

/// A stored subscription with what only the server keeps of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The state entitlements resolve from.
    pub sub: Subscription,
    /// Whether the store will renew it by itself.
    pub auto_renew: bool,
    /// A Sandbox purchase accepted by a production server.
    pub sandbox: bool,
}

const COLUMNS: &str = "store, subscription_id, product_id, plan, status, period_start, period_end, past_due_since, access_until, lifetime, auto_renew, sandbox";

fn from_row(r: &tokio_postgres::Row) -> Stored {
    Stored {
        sub: Subscription {
            store: Store::parse(r.get(0)).unwrap_or(Store::Stripe),
            subscription_id: r.get(1),
            product_id: r.get(2),
            plan: r.get(3),
            status: SubscriptionStatus::parse(r.get(4)).unwrap_or_default(),
            period_start: r.get(5),
            period_end: r.get(6),
            past_due_since: r.get(7),
            access_until: r.get(8),
            lifetime: r.get(9),
        },
        auto_renew: r.get(10),
        sandbox: r.get(11),
    }
}

/// Every subscription of `user`, in every store.
pub async fn load(client: &impl GenericClient, user: Uuid) -> ApiResult<Vec<Stored>> {
    let st = client.prepare_cached(&format!("SELECT {COLUMNS} FROM store_subscriptions WHERE user_id = $1")).await?;
    Ok(client.query(&st, &[&user]).await?.iter().map(from_row).collect())
}

/// Stores `s` as the state of its (store, subscription id), with the webhook events of the
/// change (`subscription.*`) in the same transaction.
pub async fn store(client: &impl GenericClient, user: Uuid, s: &Stored, now: DateTime<Utc>) -> ApiResult<()> {
    let sub = &s.sub;
    let st = client
        .prepare_cached(&format!("SELECT {COLUMNS} FROM store_subscriptions WHERE user_id = $1 AND store = $2 AND subscription_id = $3"))
        .await?;
    let old = client.query_opt(&st, &[&user, &sub.store.as_str(), &sub.subscription_id]).await?.map(|r| from_row(&r));
    if old.as_ref() == Some(s) {
        return Ok(());
    }
    client
        .execute(
            &format!(
                "INSERT INTO store_subscriptions (user_id, {COLUMNS}, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, now()) \
                 ON CONFLICT (user_id, store, subscription_id) DO UPDATE SET product_id = excluded.product_id, plan = excluded.plan, \
                 status = excluded.status, period_start = excluded.period_start, period_end = excluded.period_end, \
                 past_due_since = excluded.past_due_since, access_until = excluded.access_until, lifetime = excluded.lifetime, \
                 auto_renew = excluded.auto_renew, sandbox = excluded.sandbox, updated_at = now()"
            ),
            &[
                &user,
                &sub.store.as_str(),
                &sub.subscription_id,
                &sub.product_id,
                &sub.plan,
                &sub.status.as_str(),
                &sub.period_start,
                &sub.period_end,
                &sub.past_due_since,
                &sub.access_until,
                &sub.lifetime,
                &s.auto_renew,
                &s.sandbox,
            ],
        )
        .await?;
    crate::webhooks::outbox::subscription_changed(client, user, old.as_ref(), s, now).await
}

/// The past-due grace of `TALLY_PAST_DUE_GRACE_SECS` (for stores that give no date).
pub fn grace(state: &AppState) -> Duration {
    Duration::seconds(i64::try_from(state.config.past_due_grace_secs).unwrap_or(i64::MAX / 2_000))
}

/// Rewrites the `subscriptions` summary of `user` (the subscription in effect at `now`) and
/// bumps the entitlement version; call after any change of their store subscriptions.
pub async fn refresh(
    client: &impl GenericClient,
    cache: &crate::user_cache::UserCache,
    user: Uuid,
    catalog: &Catalog,
    now: DateTime<Utc>,
    grace: Duration,
) -> ApiResult<()> {
    let subs: Vec<Subscription> = load(client, user).await?.into_iter().map(|s| s.sub).collect();
    if let Some(s) = tally_core::subscription::in_effect(&subs, catalog, now, grace) {
        let plan = s.plan.clone().unwrap_or_else(|| tally_core::catalog::FREE_PLAN.to_string());
        client
            .execute(
                "INSERT INTO subscriptions (user_id, plan, status, period_start, period_end, past_due_since, provider, provider_subscription_id, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now()) ON CONFLICT (user_id) DO UPDATE SET plan = excluded.plan, status = excluded.status, \
                 period_start = excluded.period_start, period_end = excluded.period_end, past_due_since = excluded.past_due_since, provider = excluded.provider, \
                 provider_subscription_id = excluded.provider_subscription_id, updated_at = now()",
                &[&user, &plan, &s.status.as_str(), &s.period_start, &s.period_end, &s.past_due_since, &s.store.as_str(), &s.subscription_id],
            )
            .await?;
    }
    crate::users::bump_version(client, cache, user, now).await
}

/// Whether `s` is a subscription (not a one-time plan) still running at `now`: active,
/// trialing or past due, its store-dated access not over.
fn running(s: &Stored, now: DateTime<Utc>) -> bool {
    s.sub.renews() && s.sub.access_until.is_none_or(|u| u > now)
}

/// The store subscription that still renews by itself (App Store, Play: the server cannot
/// cancel it), if any.
pub async fn renewing_elsewhere(client: &impl GenericClient, user: Uuid, now: DateTime<Utc>) -> ApiResult<Option<Stored>> {
    Ok(load(client, user).await?.into_iter().find(|s| s.sub.store != Store::Stripe && s.auto_renew && running(s, now)))
}

/// A subscription of `user` still running in any store, if any (a second one is refused at
/// checkout: plans change in the store that sold the first).
pub async fn running_anywhere(client: &impl GenericClient, user: Uuid, now: DateTime<Utc>) -> ApiResult<Option<Stored>> {
    Ok(load(client, user).await?.into_iter().find(|s| running(s, now)))
}

/// Where the user cancels a subscription of `store`.
pub fn where_to_cancel(store: Store) -> &'static str {
    match store {
        Store::AppStore => "in the App Store (Settings → your name → Subscriptions on the iPhone)",
        Store::Play => "in Google Play (Play Store → Payments & subscriptions → Subscriptions)",
        Store::Stripe => "in the billing portal",
    }
}
