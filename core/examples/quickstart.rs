//! Quickstart: open a database, load a two-plan catalog, create a user, consume until a limit
//! is hit, then upgrade to pro and print a usage report.
//!
//! Run with `cargo run -p tally-core --example quickstart [path/to/tally.db]`
//! (without a path, a fresh database in a temporary directory, removed at the end). The catalog
//! is `examples/plans.json`, the one `scripts/serve` loads.

use chrono::{Duration, Utc};
use tally_core::{Catalog, Config, Entitlements, GroupBy, SubscriptionStatus, Tally, UsageMeta};

/// The demo catalog the README's server loads too (`examples/plans.json`).
const CATALOG: &str = include_str!("../../examples/plans.json");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Without a path: a database in a temporary directory, removed when the example ends.
    let scratch = tempfile::tempdir()?;
    let path = match std::env::args().nth(1) {
        Some(p) => std::path::PathBuf::from(p),
        None => scratch.path().join("tally-quickstart.db"),
    };
    let catalog = Catalog::from_json(CATALOG)?;
    let tally = Tally::open(&path, Config { catalog, ..Config::default() })?;
    println!("database: {} (device {})", path.display(), tally.device_id());

    let user = tally.create_local_user(Some("Ada"))?;
    println!("user: {} ({})", user.id, user.display_name.as_deref().unwrap_or(""));

    // Consume ai_chat until the free plan's hard limit says no.
    for i in 1.. {
        let meta = UsageMeta {
            idempotency_key: Some(format!("chat-{i}")),
            model: Some("gpt-4o".into()),
            input_tokens: Some(1200),
            output_tokens: Some(300),
            ..UsageMeta::default()
        };
        let d = tally.consume(&user.id, "ai_chat", 1, meta)?;
        println!(
            "consume ai_chat #{i}: allowed={} reason={} used={} limit={:?} remaining={:?} resets_at={:?} access={}",
            d.allowed,
            d.reason.as_str(),
            d.used,
            d.limit,
            d.remaining,
            d.resets_at.map(|t| t.to_rfc3339()),
            d.access_reason
        );
        if !d.allowed {
            break;
        }
    }
    // Retrying the same request never counts twice.
    let again = tally.consume(
        &user.id,
        "ai_chat",
        1,
        UsageMeta {
            idempotency_key: Some("chat-1".into()),
            model: Some("gpt-4o".into()),
            input_tokens: Some(1200),
            output_tokens: Some(300),
            ..UsageMeta::default()
        },
    )?;
    println!(
        "replay of chat-1: the original decision again (used={}), nothing recorded; pending={}",
        again.used,
        tally.pending_events(&user.id)?
    );

    let export = tally.check(&user.id, "export", 1)?;
    println!("check export: allowed={} reason={}", export.allowed, export.reason.as_str());

    // The app learns of a purchase (no server here): pro, with credits.
    let now = Utc::now();
    tally.set_entitlements(
        &user.id,
        Entitlements {
            plan: "pro".into(),
            status: SubscriptionStatus::Active,
            period_start: Some(now),
            period_end: Some(now + Duration::days(30)),
            credit_grants: vec![tally_core::CreditGrant {
                id: "pro-1".into(),
                remaining: 1000,
                expires_at: Some(now + Duration::days(30)),
                source: "plan".into(),
            }],
            ..Entitlements::free()
        },
    )?;
    let d = tally.consume(&user.id, "ai_chat", 1, UsageMeta::default())?;
    println!("after upgrade: ai_chat allowed={} used={} limit={:?} access={}", d.allowed, d.used, d.limit, d.access_reason);
    let d = tally.consume(&user.id, "images", 4, UsageMeta::default())?;
    println!("images x4: allowed={} credit balance={}", d.allowed, tally.credit_balance(&user.id)?);

    let usage = tally.usage(&user.id, "ai_chat")?;
    println!(
        "usage ai_chat: used={} limit={:?} remaining={:?} period_start={:?}",
        usage.used,
        usage.limit,
        usage.remaining,
        usage.period_start.map(|t| t.to_rfc3339())
    );

    println!("report by feature (today):");
    for row in tally.report(&user.id, now - Duration::days(1), now + Duration::days(1), GroupBy::Feature)? {
        println!(
            "  {:<8} events={} amount={} input_tokens={} output_tokens={} cost_micros={}",
            row.key, row.events, row.amount, row.input_tokens, row.output_tokens, row.cost_micros
        );
    }
    println!("pending events (not yet synced): {}", tally.pending_events(&user.id)?);
    Ok(())
}
