//! The `email_canonical` columns (of `password_credentials` and `users`): every comparison of
//! emails is made on them, in the form of [`tally_core::contract::canonical_email`]. SQL cannot
//! compute that form, so after the migrations, under the same advisory lock and before the
//! server serves, [`complete`] fills them from Rust once: where existing rows collide (a password
//! account, or a pending user, of the same canonical address), the verified one keeps the
//! address, else the oldest; the others, and the addresses without a canonical form, are
//! reported in the log and in `email_collisions` (the console shows them); then unique indexes on
//! the column replace the `lower(email)` ones.

use std::collections::BTreeMap;
use tally_core::contract::canonical_email;
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// One row with an address: its owner, address, whether verified, and creation time.
struct Row {
    user_id: Uuid,
    email: String,
    verified: bool,
    created_at: chrono::DateTime<chrono::Utc>,
}

/// What became of the addresses of one table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Rows that got their canonical address.
    pub kept: usize,
    /// Rows that lost their address to a colliding row.
    pub collided: usize,
    /// Rows whose address has no canonical form.
    pub refused: usize,
}

/// Fills `email_canonical` and builds its unique indexes, unless done already (the `lower(email)`
/// indexes are gone); idempotent, in one transaction. Runs under the migration lock.
pub async fn complete(client: &mut tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let to_do = tx
        .query_one("SELECT to_regclass('password_credentials_email') IS NOT NULL OR to_regclass('users_pending_email') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0);
    if !to_do {
        return Ok(());
    }
    let credentials = tx
        .query("SELECT user_id, email, email_verified_at IS NOT NULL, created_at FROM password_credentials", &[])
        .await?
        .iter()
        .map(|r| Row { user_id: r.get(0), email: r.get(1), verified: r.get(2), created_at: r.get(3) })
        .collect();
    let credentials = settle(&tx, "password_credentials", credentials, true).await?;
    // Pending users are unique by address; every other user only gets its canonical address.
    let users =
        tx.query("SELECT user_id, email, email_verified, created_at, external_id IS NULL FROM users WHERE email IS NOT NULL", &[]).await?;
    let (pending, others): (Vec<_>, Vec<_>) = users.iter().partition(|r| r.get::<_, bool>(4));
    let row = |r: &&tokio_postgres::Row| Row { user_id: r.get(0), email: r.get(1), verified: r.get(2), created_at: r.get(3) };
    let pending = settle(&tx, "users", pending.iter().map(row).collect(), true).await?;
    settle(&tx, "users", others.iter().map(row).collect(), false).await?;
    tx.batch_execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS password_credentials_email_canonical ON password_credentials (email_canonical); \
         CREATE UNIQUE INDEX IF NOT EXISTS users_pending_email_canonical ON users (email_canonical) WHERE external_id IS NULL; \
         DROP INDEX IF EXISTS password_credentials_email; DROP INDEX IF EXISTS users_pending_email;",
    )
    .await?;
    tx.commit().await?;
    tracing::info!(?credentials, ?pending, "canonical email addresses filled; they are unique from now on");
    Ok(())
}

/// Writes the canonical address of each row; with `unique`, of each group of colliding rows only
/// the verified (else the oldest) one keeps it, and the others, like the rows without a
/// canonical form, are reported.
async fn settle(tx: &impl GenericClient, table: &str, rows: Vec<Row>, unique: bool) -> Result<Outcome, tokio_postgres::Error> {
    let mut groups: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    let mut refused = Vec::new();
    for row in rows {
        match canonical_email(&row.email) {
            Ok(c) => groups.entry(c).or_default().push(row),
            Err(_) => refused.push(row),
        }
    }
    let mut outcome = Outcome::default();
    let (mut ids, mut canonicals) = (Vec::new(), Vec::new());
    for (canonical, mut group) in groups {
        group.sort_by_key(|r| (!r.verified, r.created_at, r.user_id));
        let keep = if unique { 1 } else { group.len() };
        for (i, row) in group.iter().enumerate() {
            if i < keep {
                ids.push(row.user_id);
                canonicals.push(canonical.clone());
                outcome.kept += 1;
            } else {
                report(tx, table, row, Some(&canonical), Some(group[0].user_id)).await?;
                outcome.collided += 1;
            }
        }
    }
    for row in refused.iter().filter(|_| unique) {
        report(tx, table, row, None, None).await?;
        outcome.refused += 1;
    }
    tx.execute(
        &format!("UPDATE {table} t SET email_canonical = c.canonical FROM unnest($1::uuid[], $2::text[]) AS c (user_id, canonical) WHERE t.user_id = c.user_id"),
        &[&ids, &canonicals],
    )
    .await?;
    Ok(outcome)
}

async fn report(
    tx: &impl GenericClient,
    table: &str,
    row: &Row,
    canonical: Option<&str>,
    kept_by: Option<Uuid>,
) -> Result<(), tokio_postgres::Error> {
    match kept_by {
        Some(kept_by) => tracing::warn!(
            table, user_id = %row.user_id, %kept_by,
            "two rows had one canonical email address: this one lost it (listed in the console) and no longer signs in or matches by email"
        ),
        None => tracing::warn!(
            table, user_id = %row.user_id,
            "an email address has no canonical form (a look-alike character): it no longer signs in or matches by email (listed in the console)"
        ),
    }
    tx.execute(
        "INSERT INTO email_collisions (table_name, user_id, email, canonical, kept_by) VALUES ($1, $2, $3, $4, $5)",
        &[&table, &row.user_id, &row.email, &canonical, &kept_by],
    )
    .await?;
    Ok(())
}

/// An address the canonical backfill took from a row, as the console lists it.
#[derive(Debug, Clone)]
pub struct Collision {
    /// `password_credentials` (a password account) or `users` (a pending user).
    pub table_name: String,
    /// The row's user.
    pub user_id: Uuid,
    /// The address it had.
    pub email: String,
    /// The user that kept the address (`None`: the address has no canonical form).
    pub kept_by: Option<Uuid>,
}

/// Every reported collision, the oldest first.
pub async fn collisions(client: &impl deadpool_postgres::GenericClient) -> crate::ApiResult<Vec<Collision>> {
    Ok(client
        .query("SELECT table_name, user_id, email, kept_by FROM email_collisions ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| Collision { table_name: r.get(0), user_id: r.get(1), email: r.get(2), kept_by: r.get(3) })
        .collect())
}
