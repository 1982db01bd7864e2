//! The outbox: events written inside the transaction of the change that causes them, so none is
//! lost or invented, with ids derived from their cause (`UUIDv5`), so a cause seen twice — a
//! replayed store notification, two replicas sweeping the same boundary — makes one event. An
//! event is stored only when some endpoint subscribes to its type, with one pending delivery per
//! such endpoint.

use crate::billing::subscriptions::Stored;
use crate::error::ApiResult;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::{Value, json};
use tally_core::SubscriptionStatus;
use tally_core::wire::Total;
use uuid::Uuid;

/// How often every replica sweeps for events caused by time passing.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// Usage thresholds of a limited rule's window, in percent.
pub const THRESHOLDS: [u64; 2] = [80, 100];

/// The event id of a cause: `UUIDv5` over the user, the type and the cause's parts.
pub fn event_id(user: Uuid, kind: &str, parts: &[&str]) -> Uuid {
    let key = format!("webhook|{user}|{kind}|{}", parts.join("|"));
    Uuid::new_v5(&tally_core::ledger::KEY_NAMESPACE, key.as_bytes())
}

/// Writes event `id` of `kind` about `user` (its `data` gets `user_id` and the user's
/// `subject` unless it names them) and a delivery to every endpoint subscribed to `kind`;
/// nothing when no endpoint is, or when the event exists already.
pub async fn emit(tx: &impl GenericClient, user: Uuid, kind: &str, id: Uuid, data: Value, now: DateTime<Utc>) -> ApiResult<()> {
    emit_all(tx, user, kind, vec![(id, data)], now).await
}

/// [`emit`] of several events of one kind, in one statement (in their order).
pub async fn emit_all(tx: &impl GenericClient, user: Uuid, kind: &str, events: Vec<(Uuid, Value)>, now: DateTime<Utc>) -> ApiResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let (ids, data): (Vec<Uuid>, Vec<Value>) = events.into_iter().unzip();
    let st = tx
        .prepare_cached(
            "WITH ev AS ( \
               INSERT INTO webhook_events (user_id, event_id, type, created_at, data) \
               SELECT $1, e.id, $3, $4, jsonb_build_object('user_id', $1::uuid, 'subject', (SELECT external_id FROM users WHERE user_id = $1)) || e.data \
               FROM unnest($2::uuid[], $5::jsonb[]) WITH ORDINALITY AS e(id, data, n) \
               WHERE EXISTS (SELECT 1 FROM webhook_endpoints WHERE $3 = ANY(events)) ORDER BY e.n \
               ON CONFLICT DO NOTHING RETURNING user_id, event_id, seq) \
             INSERT INTO webhook_deliveries (user_id, event_id, endpoint_id, seq, next_attempt_at, queued_at) \
             SELECT ev.user_id, ev.event_id, p.endpoint_id, ev.seq, $4, $4 FROM ev, webhook_endpoints p WHERE $3 = ANY(p.events)",
        )
        .await?;
    tx.execute(&st, &[&user, &ids, &kind, &now, &data]).await?;
    Ok(())
}

/// Deletes an event once no delivery of it is pending (an `account.deleted`: nothing naming
/// the user stays after it was delivered or gave up).
pub async fn purge_if_settled(tx: &impl GenericClient, user: Uuid, id: Uuid) -> ApiResult<()> {
    tx.execute(
        "DELETE FROM webhook_events e WHERE e.user_id = $1 AND e.event_id = $2 \
         AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.user_id = $1 AND d.event_id = $2 AND d.state = 'pending')",
        &[&user, &id],
    )
    .await?;
    Ok(())
}

fn ts(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "-".into(), |t| t.timestamp_micros().to_string())
}

fn sub_data(s: &Stored) -> Value {
    let sub = &s.sub;
    json!({"store": sub.store, "subscription_id": sub.subscription_id, "product_id": sub.product_id, "plan": sub.plan,
        "status": sub.status, "period_start": sub.period_start, "period_end": sub.period_end, "past_due_since": sub.past_due_since,
        "access_until": sub.access_until, "lifetime": sub.lifetime, "auto_renew": s.auto_renew})
}

fn running(s: SubscriptionStatus) -> bool {
    matches!(s, SubscriptionStatus::Active | SubscriptionStatus::Trialing | SubscriptionStatus::PastDue)
}

/// The subscription events of one store subscription going from `old` (none: first seen) to
/// `new`: `started` (it runs where it did not), `renewed` (a later period while running),
/// `past_due`, `canceled` (it stops renewing: auto-renew off, or canceled before its end) and
/// `expired` (it stopped running).
pub fn subscription_events(old: Option<&Stored>, new: &Stored) -> Vec<(&'static str, String)> {
    let n = &new.sub;
    let was = old.map(|o| o.sub.status);
    let mut out = Vec::new();
    let key = |what: &str| format!("{}|{}|{what}", n.store.as_str(), n.subscription_id);
    let is_running = running(n.status);
    let was_running = was.is_some_and(running);
    if matches!(n.status, SubscriptionStatus::Active | SubscriptionStatus::Trialing) && !was_running {
        out.push(("subscription.started", key(&format!("start|{}", ts(n.period_start)))));
    }
    if let Some(o) = old
        && was_running
        && matches!(n.status, SubscriptionStatus::Active | SubscriptionStatus::Trialing)
        && n.period_end.is_some_and(|e| o.sub.period_end.is_none_or(|oe| e > oe))
    {
        out.push(("subscription.renewed", key(&format!("renew|{}", ts(n.period_end)))));
    }
    if n.status == SubscriptionStatus::PastDue && was != Some(SubscriptionStatus::PastDue) {
        out.push(("subscription.past_due", key(&format!("past_due|{}", ts(n.past_due_since)))));
    }
    let renewing_before = old.is_some_and(|o| running(o.sub.status) && o.auto_renew && !o.sub.lifetime);
    let stops_renewing = !new.auto_renew || !is_running;
    if renewing_before && stops_renewing {
        out.push(("subscription.canceled", key(&format!("cancel|{}", ts(n.period_end)))));
    }
    if was_running && !is_running {
        out.push(("subscription.expired", key(&format!("expire|{}", ts(n.period_end)))));
    }
    out
}

/// Emits the subscription events of `old` → `new` (see [`subscription_events`]); a past-due
/// App Store or Play subscription is also a `payment.failed`.
pub async fn subscription_changed(
    tx: &impl GenericClient,
    user: Uuid,
    old: Option<&Stored>,
    new: &Stored,
    now: DateTime<Utc>,
) -> ApiResult<()> {
    for (kind, key) in subscription_events(old, new) {
        emit(tx, user, kind, event_id(user, kind, &[&key]), sub_data(new), now).await?;
        if kind == "subscription.past_due" && new.sub.store != tally_core::Store::Stripe {
            // The App Store and Play tell of a failed renewal only as billing retry.
            let failed = Payment {
                kind: "payment.failed",
                store: new.sub.store.as_str(),
                payment_id: &new.sub.subscription_id,
                occurrence: &key,
                subscription_id: Some(&new.sub.subscription_id),
                product_id: new.sub.product_id.as_deref(),
                amount: None,
                currency: None,
            };
            payment(tx, user, &failed, now).await?;
        }
    }
    Ok(())
}

/// A payment event (`payment.succeeded|failed|refunded`) of `store`'s payment `payment_id`,
/// once per (kind, store, payment, `occurrence`).
pub struct Payment<'a> {
    /// `payment.succeeded`, `payment.failed` or `payment.refunded`.
    pub kind: &'static str,
    /// `stripe`, `app_store`, `play`.
    pub store: &'a str,
    /// The store's id of the payment (invoice, Checkout Session, transaction, order).
    pub payment_id: &'a str,
    /// What makes this occurrence distinct (a Stripe event id; empty when the payment has one).
    pub occurrence: &'a str,
    /// The subscription it pays for, if any.
    pub subscription_id: Option<&'a str>,
    /// The product or price.
    pub product_id: Option<&'a str>,
    /// Amount in the currency's minor unit (refunds: the amount refunded).
    pub amount: Option<i64>,
    /// ISO currency code.
    pub currency: Option<&'a str>,
}

/// Emits a payment event.
pub async fn payment(tx: &impl GenericClient, user: Uuid, p: &Payment<'_>, now: DateTime<Utc>) -> ApiResult<()> {
    let data = json!({"store": p.store, "payment_id": p.payment_id, "subscription_id": p.subscription_id, "product_id": p.product_id,
        "amount": p.amount, "currency": p.currency});
    emit(tx, user, p.kind, event_id(user, p.kind, &[p.store, p.payment_id, p.occurrence]), data, now).await
}

/// Emits `credits.granted` for a stored credit grant.
#[allow(clippy::too_many_arguments)]
pub async fn credits_granted(
    tx: &impl GenericClient,
    user: Uuid,
    grant_id: &str,
    amount: i64,
    source: &str,
    reason: Option<&str>,
    expires_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> ApiResult<()> {
    let data = json!({"grant_id": grant_id, "amount": amount, "source": source, "reason": reason, "expires_at": expires_at});
    emit(tx, user, "credits.granted", event_id(user, "credits.granted", &[grant_id]), data, now).await
}

/// Emits `entitlements.changed` for version `ver` of the user's entitlements.
pub async fn entitlements_changed(tx: &impl GenericClient, user: Uuid, ver: i64, now: DateTime<Utc>) -> ApiResult<()> {
    emit(tx, user, "entitlements.changed", event_id(user, "entitlements.changed", &[&ver.to_string()]), json!({"ver": ver}), now).await
}

/// The thresholds (percent) a window's total has reached: 80 and 100 of a limited, non-zero limit.
pub fn reached(used: u64, limit: Option<u64>) -> Vec<u64> {
    let Some(limit) = limit.filter(|l| *l > 0) else { return Vec::new() };
    THRESHOLDS.into_iter().filter(|p| u128::from(used) * 100 >= u128::from(limit) * u128::from(*p)).collect()
}

/// The thresholds (percent) that adding `added` to a window crossed, ending at `used`.
pub fn crossed(used: u64, added: u64, limit: Option<u64>) -> Vec<u64> {
    let before = reached(used.saturating_sub(added), limit);
    reached(used, limit).into_iter().filter(|p| !before.contains(p)).collect()
}

/// Emits `usage.threshold` for every threshold a window's total crossed (each given with what
/// the batch added to it), once per (user, feature, period, window start, threshold).
pub async fn usage_thresholds(tx: &impl GenericClient, user: Uuid, totals: &[(&Total, u64)], now: DateTime<Utc>) -> ApiResult<()> {
    let mut events = Vec::new();
    for (t, added) in totals {
        for p in crossed(t.used, *added, t.limit) {
            let period = t.period.as_str();
            let start = t.period_start.timestamp_micros().to_string();
            let id = event_id(user, "usage.threshold", &[&t.feature, period, &start, &p.to_string()]);
            let data = json!({"feature": t.feature, "period": period, "period_start": t.period_start, "period_end": t.period_end,
                "threshold": p, "used": t.used, "limit": t.limit});
            events.push((id, data));
        }
    }
    emit_all(tx, user, "usage.threshold", events, now).await
}

/// Emits, per user, the events time caused since the last sweep: an access grant that ended
/// (`entitlements.changed`), a past-due subscription whose grace ended (`subscription.expired`
/// and `entitlements.changed`). Ids come from (user, boundary), so replicas sweeping the same
/// span make one event; the span's end is kept in `webhook_sweeps` once every user's events of
/// it are written.
pub async fn sweep(state: &crate::AppState) -> ApiResult<()> {
    let mut client = state.pool.get().await?;
    let wanted: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM webhook_endpoints WHERE events && ARRAY['entitlements.changed', 'subscription.expired'])",
            &[],
        )
        .await?
        .get(0);
    let now = state.now();
    let from: DateTime<Utc> =
        client.query_opt("SELECT swept_until FROM webhook_sweeps WHERE name = 'time'", &[]).await?.map_or(now, |r| r.get(0));
    if !wanted || from >= now {
        return mark_swept(&client, now).await;
    }
    let grace = crate::billing::subscriptions::grace(state);
    let grants = client
        .query("SELECT user_id, grant_id, until FROM access_grants WHERE revoked_at IS NULL AND until > $1 AND until <= $2", &[&from, &now])
        .await?;
    // Past due without a store date: the grace ends at `past_due_since + grace`; with a store
    // date (Apple's billing grace period, a refunded purchase): at `access_until`.
    let graces = client
        .query(
            "SELECT user_id, store, subscription_id, past_due_since, access_until FROM store_subscriptions \
             WHERE (status = 'past_due' AND access_until IS NULL AND past_due_since > $3 AND past_due_since <= $4) \
                OR (status IN ('active', 'trialing', 'past_due') AND access_until > $1 AND access_until <= $2)",
            &[&from, &now, &(from - grace), &(now - grace)],
        )
        .await?;
    for r in &grants {
        let (user, grant, until): (Uuid, Uuid, DateTime<Utc>) = (r.get(0), r.get(1), r.get(2));
        let tx = client.transaction().await?;
        let id = event_id(user, "entitlements.changed", &["grant_end", &grant.to_string()]);
        emit(&tx, user, "entitlements.changed", id, json!({"reason": "grant_ended", "grant_id": grant, "at": until}), until).await?;
        tx.commit().await?;
    }
    for r in &graces {
        let (user, store, sub): (Uuid, String, String) = (r.get(0), r.get(1), r.get(2));
        let (since, until): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = (r.get(3), r.get(4));
        let Some(at) = until.or(since.map(|s| s + grace)) else { continue };
        let tx = client.transaction().await?;
        let key = format!("{store}|{sub}|grace_end|{}", at.timestamp_micros());
        let data = json!({"store": store, "subscription_id": sub, "past_due_since": since, "access_until": until, "reason": "grace_ended"});
        emit(&tx, user, "subscription.expired", event_id(user, "subscription.expired", &[&key]), data.clone(), at).await?;
        let id = event_id(user, "entitlements.changed", &[&key]);
        emit(&tx, user, "entitlements.changed", id, json!({"reason": "grace_ended", "store": store, "subscription_id": sub, "at": at}), at)
            .await?;
        tx.commit().await?;
    }
    mark_swept(&client, now).await
}

/// Keeps `now` as the end of the span swept (never moving it back).
async fn mark_swept(client: &impl GenericClient, now: DateTime<Utc>) -> ApiResult<()> {
    client
        .execute(
            "INSERT INTO webhook_sweeps (name, swept_until) VALUES ('time', $1) \
             ON CONFLICT (name) DO UPDATE SET swept_until = GREATEST(webhook_sweeps.swept_until, excluded.swept_until)",
            &[&now],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::{Store, Subscription};

    fn stored(status: SubscriptionStatus, end: i64, auto_renew: bool) -> Stored {
        let at = |s: i64| DateTime::from_timestamp(1_750_000_000 + s, 0);
        Stored {
            sub: Subscription {
                store: Store::Stripe,
                subscription_id: "sub_1".into(),
                product_id: None,
                plan: Some("pro".into()),
                status,
                period_start: at(end - 100),
                period_end: at(end),
                past_due_since: None,
                access_until: None,
                lifetime: false,
            },
            auto_renew,
            sandbox: false,
        }
    }

    fn kinds(old: Option<&Stored>, new: &Stored) -> Vec<&'static str> {
        subscription_events(old, new).into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn subscription_transitions_name_their_events() {
        use SubscriptionStatus::{Active, Canceled, PastDue};
        let active = stored(Active, 100, true);
        assert_eq!(kinds(None, &active), ["subscription.started"]);
        assert_eq!(kinds(Some(&active), &active), Vec::<&str>::new(), "no change, no event");
        assert_eq!(kinds(Some(&active), &stored(Active, 200, true)), ["subscription.renewed"]);
        assert_eq!(kinds(Some(&active), &stored(PastDue, 100, true)), ["subscription.past_due"]);
        assert_eq!(kinds(Some(&stored(PastDue, 100, true)), &stored(Active, 200, true)), ["subscription.renewed"]);
        assert_eq!(kinds(Some(&active), &stored(Active, 100, false)), ["subscription.canceled"]);
        assert_eq!(kinds(Some(&stored(Active, 100, false)), &stored(Canceled, 100, false)), ["subscription.expired"]);
        assert_eq!(kinds(Some(&active), &stored(Canceled, 100, true)), ["subscription.canceled", "subscription.expired"]);
        assert_eq!(kinds(Some(&stored(Canceled, 100, false)), &stored(Active, 300, true)), ["subscription.started"]);
    }

    #[test]
    fn thresholds_are_80_and_100_percent_of_a_nonzero_limit() {
        assert_eq!(reached(3, Some(5)), Vec::<u64>::new());
        assert_eq!(reached(4, Some(5)), [80]);
        assert_eq!(reached(5, Some(5)), [80, 100]);
        assert_eq!(reached(9, Some(5)), [80, 100]);
        assert_eq!(reached(u64::MAX, None), Vec::<u64>::new());
        assert_eq!(reached(0, Some(0)), Vec::<u64>::new());
        assert_eq!(crossed(4, 1, Some(5)), [80], "3 → 4 of 5");
        assert_eq!(crossed(5, 1, Some(5)), [100], "80 % was crossed before");
        assert_eq!(crossed(6, 1, Some(5)), Vec::<u64>::new(), "both were crossed before");
        assert_eq!(crossed(5, 5, Some(5)), [80, 100], "one batch crosses both");
    }
}
