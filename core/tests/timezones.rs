//! Timezone changes on the device: windows follow the history of the verified device token
//! (`tz_history`), so a change keeps the window in force; the device's own change waits for the
//! server's token. A real signed token, a real SQLite file, a loopback fake server.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::*;
use serde_json::json;
use tally_core::{Entitlements, UserUpdate, ZoneChange};

/// A device token for `sub-1` on this device, issued at `iat`, whose user is in `tz` with
/// `history`.
fn token(tz: &str, history: Vec<ZoneChange>, iat: DateTime<Utc>) -> String {
    let mut ent = Entitlements::free().resolve(&catalog(), iat, Duration::days(3));
    ent.tz = Some(tz.into());
    ent.tz_history = history;
    device_token(ent, "dev-test", 1, (iat, iat + Duration::days(1)), Vec::new())
}

fn change(tz: &str, from: &str) -> ZoneChange {
    ZoneChange { tz: tz.into(), from: t(from) }
}

#[tokio::test]
async fn the_tokens_history_keeps_the_window_in_force_and_a_local_change_waits_for_the_server() {
    let (e, u) = signed_in_env();
    // The server's answer: the user moved from New York to Kiritimati at 10:30Z, 30 minutes
    // after Kiritimati's midnight; the New York day in force (from 05:00Z) holds 3 uses.
    let history = vec![
        change("UTC", "2025-01-01T00:00:00Z"),
        change("America/New_York", "2025-06-01T00:00:00Z"),
        change("Pacific/Kiritimati", "2026-01-15T10:30:00Z"),
    ];
    let answer = json!({
        "entitlements_token": token("Pacific/Kiritimati", history, t("2026-01-15T12:00:00Z")),
        "totals": [{"feature": "notes", "period": "day", "period_start": "2026-01-15T05:00:00Z", "period_end": "2026-01-16T05:00:00Z",
                    "used": 3, "limit": 3, "remaining": 0, "over_limit_by": 0}],
    });
    let server = FakeServer::start(move |_, req| {
        let mut a = accept_all(req);
        for (k, v) in answer.as_object().unwrap() {
            a[k] = v.clone();
        }
        (200, a)
    });
    let r = e.tally.sync(&u, server.options()).await.expect("sync");
    assert!(r.entitlements_updated);
    let window = |e: &Env| {
        let n = e.tally.usage(&u, "notes").expect("usage");
        (n.period_start, n.resets_at, n.used)
    };
    let in_force = (Some(t("2026-01-15T05:00:00Z")), Some(t("2026-01-16T05:00:00Z")), 3);
    assert_eq!(window(&e), in_force, "the New York day in force keeps its bounds and its uses");
    assert_eq!(e.tally.user(&u).unwrap().timezone, "Pacific/Kiritimati");

    // A change made on this device moves nothing until a verified token carries it.
    e.tally.update_user(&u, UserUpdate { timezone: Some("Asia/Tokyo".into()), ..Default::default() }).unwrap();
    assert_eq!(window(&e), in_force, "an unverified local change does not move windows");

    // The next day runs from New York's midnight to Kiritimati's first midnight a full day
    // later (the 18th, 00:00 there = 10:00Z on the 17th).
    e.clock.set(t("2026-01-16T06:00:00Z"));
    assert_eq!(window(&e), (Some(t("2026-01-16T05:00:00Z")), Some(t("2026-01-17T10:00:00Z")), 0));
    e.clock.set(t("2026-01-17T10:00:00Z"));
    assert_eq!(window(&e), (Some(t("2026-01-17T10:00:00Z")), Some(t("2026-01-18T10:00:00Z")), 0), "Kiritimati's days from here");

    // The local change goes to the server with the next sync.
    e.tally.sync(&u, server.options()).await.expect("sync");
    let sent = server.requests();
    assert_eq!(sent.last().unwrap()["profile"]["timezone"], "Asia/Tokyo");
}
