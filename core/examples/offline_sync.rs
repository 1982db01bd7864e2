//! Offline use, then sync against a running Tally server.
//!
//! ```sh
//! scripts/serve &                                   # the README's server (plans: examples/plans.json)
//! cargo run -p tally-core --example offline_sync    # TALLY_SERVER / TALLY_TOKEN override the defaults
//! ```
//!
//! The device consumes with no network at all, then syncs: the report shows what the server
//! took, and `usage()` equals the server's total from then on.

use tally_core::{Catalog, Config, Profile, SyncOptions, Tally, UsageMeta};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::var("TALLY_SERVER").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let token = match std::env::var("TALLY_TOKEN") {
        Ok(t) => t,
        Err(_) => dev_token("alice", "dev-secret")?,
    };
    // The device ships with the catalog and trusts the server's token-signing keys.
    let catalog = Catalog::from_json(include_str!("../../examples/plans.json"))?;
    let keys = reqwest::get(format!("{server}/v1/keys")).await?.error_for_status()?.text().await?;
    let dir = std::env::temp_dir().join(format!("tally-offline-sync-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tally = Tally::open(dir.join("device.db"), Config { catalog, server_keys: Some(keys), ..Config::default() })?;
    let user = tally.sign_in(Profile { external_id: "alice".into(), ..Profile::default() }, None)?;

    println!("-- offline --");
    for i in 1..=3 {
        let d = tally.consume(&user.id, "ai_chat", 1, UsageMeta::default())?;
        println!("consume ai_chat #{i}: allowed={} used={} remaining={:?}", d.allowed, d.used, d.remaining);
    }
    println!("pending events: {}", tally.pending_events(&user.id)?);

    println!("-- sync with {server} --");
    let report = tally.sync(&user.id, SyncOptions::new(&server, &token)).await?;
    println!(
        "sent {} acked {} duplicates {} rejected {} rounds {} entitlements_updated {}",
        report.events_sent,
        report.events_acked,
        report.duplicates,
        report.rejected.len(),
        report.rounds,
        report.entitlements_updated
    );
    let u = tally.usage(&user.id, "ai_chat")?;
    println!("ai_chat this month (server total incl. other devices + unacknowledged): {} of {:?}", u.used, u.limit);
    let ent = tally.entitlements(&user.id)?;
    println!("plan {} ({}), pending events {}", ent.plan, ent.access_reason, tally.pending_events(&user.id)?);

    // This demo device goes away now: like an app before `sign_out` or `delete_user`, it gives
    // its offline allowances back, so the account's room is free for other devices and backends.
    tally.release_leases(&user.id, SyncOptions::new(&server, &token)).await?;
    println!("leases released");
    drop(tally);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A development identity token (HS256 with the dev secret), like `tally-server token`.
fn dev_token(sub: &str, secret: &str) -> Result<String, jsonwebtoken::errors::Error> {
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({"sub": sub, "iat": now, "exp": now + 3600});
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()))
}
