//! Hard limits across devices (protocol 2), as a seeded simulation through real parts: one
//! account on 2–5 devices (real SQLite files, their own skewed clocks) and a backend
//! (`POST /v1/consume`), two server replicas in this process over one real Postgres, every
//! request through a [`FaultProxy`] that fails, delays and loses answers after the server
//! committed. The schedule mixes offline stretches, window rollovers (an hourly and a daily
//! pool), plan upgrades and downgrades, devices killed and reopened, devices wiped and
//! reinstalled (using the app before their first lease), replicas crashed and restarted,
//! concurrent and repeated syncs, and clocks skewed by up to two minutes either way.
//!
//! Then, for every case:
//! 1. **Safety**: for every hard pool (every window of `chat` and `img`), the server's total
//!    never exceeds the limit in effect during that window — except with causes in the
//!    window's `over_limit_causes`, each of which the schedule explains (a downgrade before the
//!    window ended, a device using the app before its first lease in it, a device offline past
//!    its lease);
//! 2. **Exactly once**: the server's total of each feature is the sum of every use a device or
//!    the backend was told was recorded (minus what a wiped device had not synced);
//! 3. **Liveness**: after every device synced twice with no new use, a device that asks for the
//!    whole pool gets the room no other device holds, less what is kept free for the other
//!    claiming devices that hold nothing (at most their equal part of it).
//!
//! Environment: `TALLY_LEASE_CASES` (default 8), `TALLY_LEASE_STEPS` (default 150),
//! `TALLY_LEASE_SEED` (replays a run; printed at start and on failure). Needs PostgreSQL:
//! fails, never skips, under `CI=true` / `TALLY_REQUIRE_PG=1`.

use chrono::{DateTime, Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tally_core::ledger::event_id_for_key;
use tally_core::{Catalog, Config, EventStatus, ManualClock, Profile, Reason, SyncOptions, Tally, UsageMeta};
use tally_e2e::proxy::{FaultProxy, Faults};
use tally_e2e::*;

/// The simulation's catalog: a daily pool devices may hold whole, an hourly pool they may hold
/// half of (the rest stays with the backend), and an unlimited feature.
const SIM_PLANS: &str = r#"{"plans": [
  {"id": "free", "features": {
    "chat":  {"type": "metered", "limit": 12, "period": "day", "enforcement": "hard"},
    "img":   {"type": "metered", "limit": 8, "period": "hour", "enforcement": "hard", "offline_share": 0.5},
    "notes": {"type": "metered", "limit": null, "period": "day"},
    "gen":   {"type": "credits", "cost": 1}}},
  {"id": "pro", "features": {
    "chat":  {"type": "metered", "limit": 30, "period": "day", "enforcement": "hard"},
    "img":   {"type": "metered", "limit": 16, "period": "hour", "enforcement": "hard", "offline_share": 0.5},
    "notes": {"type": "metered", "limit": null, "period": "day"},
    "gen":   {"type": "credits", "cost": 1}}}]}"#;

/// The hard features and their window lengths.
const HARD: [(&str, i64); 2] = [("chat", 86_400), ("img", 3_600)];
/// The admin subject of the simulation's servers.
const ADMIN: &str = "sim-admin";
/// Device token lifetime and the lease's life after it (`lease_until` = `exp` + this).
const TOKEN_TTL_SECS: u64 = 3_600;
const LEASE_ACTIVE_SECS: u64 = 3 * 3_600;
/// The most a device clock runs ahead of or behind the servers'.
const MAX_SKEW_SECS: i64 = 120;

fn limit(plan: &str, feature: &str) -> u64 {
    match (plan, feature) {
        ("pro", "chat") => 30,
        ("pro", "img") => 16,
        (_, "chat") => 12,
        (_, "img") => 8,
        _ => u64::MAX,
    }
}

/// A simulated device: its database, its clock (the servers' time plus a fixed skew), and the
/// uses it was told were recorded.
struct SimDevice {
    name: String,
    path: PathBuf,
    clock: Arc<ManualClock>,
    skew: Duration,
    tally: Tally,
    user: String,
    /// (event id, feature, amount) of every use recorded here.
    recorded: Vec<(String, String, u64)>,
    /// The servers' time of the last sync that completed.
    last_sync: Option<DateTime<Utc>>,
    /// Whether this install has completed a sync yet (before it: round-1 local decisions).
    leased: bool,
    seq: u64,
}

fn open_device(path: &Path, name: &str, keys: &str, clock: Arc<ManualClock>) -> Tally {
    let config = Config {
        device_id: Some(name.into()),
        clock,
        catalog: Catalog::from_json(SIM_PLANS).expect("catalog"),
        server_keys: Some(keys.into()),
        ..Config::default()
    };
    Tally::open(path, config).expect("open device")
}

/// The whole world of one case.
struct World {
    rng: StdRng,
    clock: Arc<ManualClock>,
    replicas: Vec<Replica>,
    proxies: Vec<FaultProxy>,
    keys: String,
    dir: PathBuf,
    db: String,
    sub: String,
    devices: Vec<SimDevice>,
    wiped: Vec<String>,
    installs: u64,
    /// Uses acknowledged to a device or the backend, per feature.
    truth: BTreeMap<String, u64>,
    /// (plan, since) in order.
    plans: Vec<(String, DateTime<Utc>)>,
    /// Server times of downgrades.
    downgrades: Vec<DateTime<Utc>>,
    /// (feature, server time) of uses decided before the device's first lease.
    before_lease: Vec<(String, DateTime<Utc>)>,
    /// Server times from which a device had been offline past its lease.
    reclaims: Vec<DateTime<Utc>>,
    backend_seq: u64,
    http: reqwest::Client,
    /// What the schedule did (printed per case, so a run shows it exercised the paths).
    stats: BTreeMap<&'static str, u64>,
}

fn now_of(w: &World) -> DateTime<Utc> {
    tally_core::Clock::now(&*w.clock)
}

fn device_now(w: &World, d: &SimDevice) -> DateTime<Utc> {
    // A device clock never runs behind what it showed before (the core keeps that too).
    let t = now_of(w) + d.skew;
    let shown = tally_core::Clock::now(&*d.clock);
    if t > shown { t } else { shown }
}

fn sync_options(w: &World, proxy: usize) -> SyncOptions {
    let mut o = SyncOptions::new(w.proxies[proxy].url.clone(), id_token(&w.sub));
    o.retry.initial_backoff = std::time::Duration::from_millis(5);
    o.retry.max_backoff = std::time::Duration::from_millis(40);
    o.retry.max_attempts = 4;
    o.timeout = std::time::Duration::from_secs(10);
    o
}

impl World {
    async fn new(seed: u64, pg: &tally_server::pg_cluster::Cluster, case: usize) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::Builder::new().prefix("tally-leases-").tempdir_in("/tmp").expect("tempdir").keep();
        let db = pg.create_database(&format!("leases_{case}_{seed}")).await.expect("database");
        std::fs::write(dir.join("plans.json"), SIM_PLANS).expect("plans");
        // The start comes from the seed alone, so a printed seed replays the same schedule.
        let start = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").expect("epoch").with_timezone(&Utc)
            + Duration::hours(rng.random_range(0..24 * 365))
            + Duration::minutes(rng.random_range(0..60));
        let clock = Arc::new(ManualClock::new(start));
        let mut config = tally_server::Config::for_database(&db);
        config.jwt_secret = Some(JWT_SECRET.into());
        config.data_dir = dir.join("server");
        config.plans_file = Some(dir.join("plans.json"));
        config.admin_subjects = vec![ADMIN.into()];
        config.rate_limit_per_sec = 100_000;
        config.rate_limit_burst = 100_000;
        config.db_pool_size = 4;
        config.token_ttl_secs = TOKEN_TTL_SECS;
        config.lease_active_secs = LEASE_ACTIVE_SECS;
        let mut replicas = Vec::new();
        for _ in 0..2 {
            replicas.push(Replica::start(config.clone(), clock.clone()).await);
        }
        let proxies: Vec<FaultProxy> =
            replicas.iter().enumerate().map(|(i, r)| FaultProxy::start(&r.url, 1 << 20, seed.wrapping_add(i as u64))).collect();
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10)).build().expect("client");
        let keys = http.get(format!("{}/v1/keys", replicas[0].url)).send().await.expect("keys").text().await.expect("keys");
        let mut w = World {
            rng,
            clock,
            replicas,
            proxies,
            keys,
            dir,
            db: db.clone(),
            sub: format!("sim-user-{seed}"),
            devices: Vec::new(),
            wiped: Vec::new(),
            installs: 0,
            truth: BTreeMap::new(),
            plans: vec![("free".into(), start - Duration::days(1))],
            downgrades: Vec::new(),
            before_lease: Vec::new(),
            reclaims: Vec::new(),
            backend_seq: 0,
            http,
            stats: BTreeMap::new(),
        };
        let n = w.rng.random_range(2..=5);
        for _ in 0..n {
            w.install();
        }
        w
    }

    /// A new install (a new device id) signed in to the account.
    fn install(&mut self) {
        self.installs += 1;
        let name = format!("dev{}", self.installs);
        let path = self.dir.join(format!("{name}.db"));
        let skew = Duration::seconds(self.rng.random_range(-MAX_SKEW_SECS..=MAX_SKEW_SECS));
        let clock = Arc::new(ManualClock::new(now_of(self) + skew));
        let tally = open_device(&path, &name, &self.keys, clock.clone());
        let user = tally
            .sign_in(
                Profile { external_id: self.sub.clone(), email: Some(format!("{}@example.com", self.sub)), ..Profile::default() },
                None,
            )
            .expect("sign in")
            .id;
        self.devices.push(SimDevice { name, path, clock, skew, tally, user, recorded: Vec::new(), last_sync: None, leased: false, seq: 0 });
    }

    fn plan_at(&self, at: DateTime<Utc>) -> &str {
        self.plans.iter().rev().find(|(_, since)| *since <= at).map_or("free", |(p, _)| p.as_str())
    }

    /// The highest limit of `feature` in effect at any time of `[start, end)`.
    fn limit_during(&self, feature: &str, start: DateTime<Utc>, end: DateTime<Utc>) -> u64 {
        let mut hi = limit(self.plan_at(start), feature);
        for (p, since) in &self.plans {
            if *since >= start && *since < end {
                hi = hi.max(limit(p, feature));
            }
        }
        hi
    }

    async fn admin(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.replicas[0].url))
            .bearer_auth(id_token(ADMIN))
            .json(&body)
            .send()
            .await
            .expect("admin request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// One use on device `i`; the truth counts it when the device says it was recorded.
    fn consume(&mut self, i: usize) {
        let feature = ["chat", "chat", "img", "notes"][self.rng.random_range(0..4)];
        let amount = self.rng.random_range(1..=3);
        let now = device_now(self, &self.devices[i]);
        let server_now = now_of(self);
        let d = &mut self.devices[i];
        d.clock.set(now);
        d.seq += 1;
        let key = format!("{}-{}", d.name, d.seq);
        let meta = UsageMeta { idempotency_key: Some(key.clone()), ..UsageMeta::default() };
        let decision = d.tally.consume(&d.user, feature, amount, meta).expect("consume");
        *self
            .stats
            .entry(match decision.reason {
                Reason::LeaseExhausted => "device lease_exhausted",
                Reason::LimitReached => "device limit_reached",
                _ => "device uses",
            })
            .or_default() += 1;
        if decision.allowed {
            d.recorded.push((event_id_for_key(&key).to_string(), feature.into(), amount));
            *self.truth.entry(feature.into()).or_default() += amount;
            if !d.leased && feature != "notes" {
                self.before_lease.push((feature.into(), server_now));
            }
        } else {
            assert!(
                matches!(decision.reason, Reason::LimitReached | Reason::LeaseExhausted),
                "a hard pool denies only for its limit or the lease: {decision:?}"
            );
        }
    }

    /// A backend use through `POST /v1/consume`, retried with the same id until answered.
    async fn backend(&mut self) {
        let feature = if self.rng.random_bool(0.5) { "chat" } else { "img" };
        let amount = self.rng.random_range(1..=3);
        self.backend_seq += 1;
        let id = uuid::Uuid::new_v4();
        let proxy = self.rng.random_range(0..self.proxies.len());
        let body = json!({"feature": feature, "amount": amount, "id": id});
        for _ in 0..20 {
            let r =
                self.http.post(format!("{}/v1/consume", self.proxies[proxy].url)).bearer_auth(id_token(&self.sub)).json(&body).send().await;
            let Ok(r) = r else { continue };
            let status = r.status().as_u16();
            let Ok(v) = r.json::<Value>().await else { continue };
            match status {
                200 => {
                    *self.truth.entry(feature.into()).or_default() += amount;
                    *self.stats.entry("backend uses").or_default() += 1;
                    return;
                }
                402 => {
                    let held = v["decision"]["held_offline"].as_u64().is_some_and(|h| h > 0);
                    *self.stats.entry(if held { "backend 402 held_offline" } else { "backend 402" }).or_default() += 1;
                    let code = v["error"]["code"].as_str().unwrap_or_default().to_string();
                    assert_eq!(code, "limit_reached", "{v}");
                    return;
                }
                500..=599 => continue,
                _ => panic!("backend consume answered {status}: {v}"),
            }
        }
    }

    /// Syncs device `i` through a random replica; a sync that gives up leaves it pending.
    async fn sync(&mut self, i: usize) -> bool {
        let proxy = self.rng.random_range(0..self.proxies.len());
        let opts = sync_options(self, proxy);
        let now = device_now(self, &self.devices[i]);
        let d = &self.devices[i];
        d.clock.set(now);
        match d.tally.sync(&d.user, opts).await {
            Ok(report) => {
                assert!(report.rejected.is_empty(), "{} had uses refused: {:?}", d.name, report.rejected);
                *self.stats.entry("syncs").or_default() += 1;
                let t = now_of(self);
                let d = &mut self.devices[i];
                d.last_sync = Some(t);
                d.leased = true;
                true
            }
            Err(tally_core::Error::Network(_)) | Err(tally_core::Error::Server { status: 500..=599, .. }) => false,
            Err(e) => panic!("{} sync failed: {e}", d.name),
        }
    }

    /// Moves the servers' clock on; notes devices whose lease ran out while they were away.
    fn advance(&mut self, by: Duration) {
        let before = now_of(self);
        self.clock.set(before + by);
        let lease = Duration::seconds((TOKEN_TTL_SECS + LEASE_ACTIVE_SECS) as i64) - Duration::seconds(MAX_SKEW_SECS * 2);
        for d in &self.devices {
            if let Some(at) = d.last_sync
                && before + by - at > lease
            {
                self.reclaims.push(at + lease);
            }
        }
    }

    async fn step(&mut self) {
        let n = self.devices.len();
        let i = self.rng.random_range(0..n);
        match self.rng.random_range(0..100) {
            0..=34 => self.consume(i),
            35..=49 => {
                self.sync(i).await;
            }
            50..=54 => {
                // Two syncs at once: two devices, or one device twice (reordered, duplicated).
                let j = if self.rng.random_bool(0.5) { i } else { self.rng.random_range(0..n) };
                let (oi, oj) = (sync_options(self, 0), sync_options(self, 1));
                let (di, dj) = (&self.devices[i], &self.devices[j]);
                let (a, b) = tokio::join!(di.tally.sync(&di.user, oi), dj.tally.sync(&dj.user, oj));
                let t = now_of(self);
                for (k, r) in [(i, a), (j, b)] {
                    match r {
                        Ok(rep) => {
                            assert!(rep.rejected.is_empty(), "refused: {:?}", rep.rejected);
                            self.devices[k].last_sync = Some(t);
                            self.devices[k].leased = true;
                        }
                        Err(tally_core::Error::Network(_)) | Err(tally_core::Error::Server { status: 500..=599, .. }) => {}
                        Err(e) => panic!("concurrent sync failed: {e}"),
                    }
                }
            }
            55..=66 => self.backend().await,
            67..=79 => {
                let mins = self.rng.random_range(1..=20);
                self.advance(Duration::minutes(mins));
            }
            80..=83 => {
                let hours = self.rng.random_range(1..=5);
                self.advance(Duration::hours(hours));
            }
            84..=86 => {
                // Upgrade or downgrade (an admin grant, or its revocation).
                let now = now_of(self);
                if self.plan_at(now) == "free" {
                    let until = (now + Duration::days(30)).to_rfc3339();
                    let (s, v) =
                        self.admin("/v1/admin/grants", json!({"subject": self.sub, "plan": "pro", "until": until, "reason": "sim"})).await;
                    assert!(s < 300, "grant: {s} {v}");
                    self.plans.push(("pro".into(), now));
                } else {
                    let (s, v) = self.admin("/v1/admin/grants/revoke", json!({"subject": self.sub})).await;
                    assert!(s < 300, "revoke: {s} {v}");
                    self.plans.push(("free".into(), now));
                    self.downgrades.push(now);
                }
            }
            87..=89 => {
                // The app is killed and started again: nothing recorded is lost.
                let d = &mut self.devices[i];
                let tally = open_device(&d.path, &d.name, &self.keys, d.clock.clone());
                d.tally = tally;
            }
            90..=91 => {
                *self.stats.entry("wipes").or_default() += 1;
                self.wipe(i).await
            }
            92..=93 => {
                let r = self.rng.random_range(0..self.replicas.len());
                self.replicas[r].crash().await;
                *self.stats.entry("replica crashes").or_default() += 1;
                self.replicas[r].start_again().await;
            }
            _ => {
                let faults = if self.rng.random_bool(0.5) {
                    Faults { fail_pct: 10, cut_pct: 15, delay_pct: 10, max_delay_ms: 30 }
                } else {
                    Faults::CLEAN
                };
                for p in &self.proxies {
                    p.set_faults(faults);
                }
            }
        }
    }

    /// Wipes device `i` and installs the app again (a new device id). What it had not synced
    /// is gone; what its lease held comes back at `lease_until`, or at once when the user
    /// removes the lost device (`DELETE /v1/me/devices/{id}`), which half the wipes do.
    async fn wipe(&mut self, i: usize) {
        let d = self.devices.remove(i);
        for (id, feature, amount) in &d.recorded {
            if d.tally.event_status(&d.user, id).expect("status") == EventStatus::Pending {
                *self.truth.get_mut(feature).expect("truth") -= amount;
            }
        }
        let name = d.name.clone();
        let path = d.path.clone();
        drop(d);
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
        }
        if self.rng.random_bool(0.5) {
            self.remove_device(&name).await;
        } else {
            self.wiped.push(name);
        }
        self.install();
    }

    async fn remove_device(&self, name: &str) {
        let r = self
            .http
            .delete(format!("{}/v1/me/devices/{name}", self.replicas[0].url))
            .bearer_auth(id_token(&self.sub))
            .send()
            .await
            .expect("delete device");
        assert!(matches!(r.status().as_u16(), 204 | 404), "DELETE /v1/me/devices/{name}: {}", r.status());
    }

    /// Every device syncs until nothing is pending (no faults).
    async fn drain(&mut self) {
        for p in &self.proxies {
            p.set_faults(Faults::CLEAN);
        }
        for name in std::mem::take(&mut self.wiped) {
            self.remove_device(&name).await;
        }
        for i in 0..self.devices.len() {
            for attempt in 0.. {
                if self.sync(i).await && self.devices[i].tally.pending_events(&self.devices[i].user).expect("pending") == 0 {
                    break;
                }
                assert!(attempt < 10, "{} does not drain", self.devices[i].name);
            }
        }
    }
}

/// The stored windows of the hard features: (feature, window start, used, causes).
async fn windows(pg_url: &str, sub: &str) -> Vec<(String, DateTime<Utc>, i64, Vec<String>)> {
    let (client, conn) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
        .query(
            "SELECT c.feature, c.period_start, c.used, c.causes FROM counters c JOIN users u ON u.user_id = c.user_id \
             WHERE u.external_id = $1 AND c.feature IN ('chat', 'img')",
            &[&sub],
        )
        .await
        .expect("counters")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// When the server received the first use of a window.
async fn first_heard(pg_url: &str, sub: &str, feature: &str, start: DateTime<Utc>, end: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let (client, conn) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
        .query_one(
            "SELECT min(e.received_at) FROM events e JOIN users u ON u.user_id = e.user_id \
             WHERE u.external_id = $1 AND e.feature = $2 AND e.effective_at >= $3 AND e.effective_at < $4",
            &[&sub, &feature, &start, &end],
        )
        .await
        .expect("first use")
        .get(0)
}

/// The uses and device slices of one window, printed when its check fails.
async fn window_trail(pg_url: &str, sub: &str, feature: &str, start: DateTime<Utc>, end: DateTime<Utc>) -> String {
    let (client, conn) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    let mut out =
        format!("window [{start}, {end}); uses (occurred_at, effective_at, received_at, device, seq, lease_ver, amount, cause, voided):\n");
    let rows = client
        .query(
            "SELECT e.occurred_at, e.effective_at, e.received_at, e.device_id, e.device_seq, e.lease_ver, e.amount, e.cause, \
             e.voided_at IS NOT NULL FROM events e JOIN users u ON u.user_id = e.user_id \
             WHERE u.external_id = $1 AND e.feature = $2 AND e.effective_at >= $3 AND e.effective_at < $4 ORDER BY e.received_at",
            &[&sub, &feature, &start, &end],
        )
        .await
        .expect("events");
    for r in rows {
        let (o, e, rc): (DateTime<Utc>, DateTime<Utc>, DateTime<Utc>) = (r.get(0), r.get(1), r.get(2));
        let (dev, seq, ver): (Option<String>, Option<i64>, Option<i64>) = (r.get(3), r.get(4), r.get(5));
        let (amount, cause, voided): (i64, Option<String>, bool) = (r.get(6), r.get(7), r.get(8));
        out += &format!("  {o} {e} {rc} {dev:?} {seq:?} {ver:?} {amount} {cause:?} {voided}\n");
    }
    let rows = client
        .query(
            "SELECT min(e.effective_at), max(e.effective_at), sum(e.amount)::bigint, count(*) FROM events e \
             JOIN users u ON u.user_id = e.user_id WHERE u.external_id = $1 AND e.feature = $2",
            &[&sub, &feature],
        )
        .await
        .expect("events");
    for r in rows {
        let (lo, hi): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = (r.get(0), r.get(1));
        let (sum, n): (Option<i64>, i64) = (r.get(2), r.get(3));
        out += &format!("all uses of {feature}: {n}, amount {sum:?}, effective {lo:?} .. {hi:?}\n");
    }
    out += "slices (device, allowance, released, consumed, recall):\n";
    let rows = client
        .query(
            "SELECT p.device_id, p.allowance, p.released, p.consumed, p.recall FROM pool_devices p JOIN users u ON u.user_id = p.user_id \
             WHERE u.external_id = $1 AND p.feature = $2 AND p.period_start = $3",
            &[&sub, &feature, &start],
        )
        .await
        .expect("slices");
    for r in rows {
        let (dev, a, rel, c, rc): (String, i64, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        out += &format!("  {dev} {a} {rel} {c} {rc}\n");
    }
    out
}

/// Checks safety, exactly-once and liveness for the world after its schedule.
async fn check(w: &mut World, pg_url: &str) -> Result<(), String> {
    w.drain().await;
    // 1. Safety: every window within its limit, or over only by causes the schedule explains.
    for (feature, start, used, causes) in windows(pg_url, &w.sub).await {
        let secs = HARD.iter().find(|(f, _)| *f == feature).map_or(86_400, |(_, s)| *s);
        let end = start + Duration::seconds(secs);
        // A window the server first heard of after it ended is judged by the limit in effect
        // when it did (it cannot know an earlier plan's).
        let lim = match first_heard(pg_url, &w.sub, &feature, start, end).await {
            Some(at) if at >= end => w.limit_during(&feature, start, end).max(limit(w.plan_at(at), &feature)),
            _ => w.limit_during(&feature, start, end),
        };
        let used = u64::try_from(used).unwrap_or(0);
        if used <= lim {
            continue;
        }
        if causes.is_empty() {
            let trail = window_trail(pg_url, &w.sub, &feature, start, end).await;
            return Err(format!("{feature} window {start}: used {used} > limit {lim} with no cause\n{trail}"));
        }
        for c in &causes {
            let explained = match c.as_str() {
                "downgrade" => w.downgrades.iter().any(|t| *t < end),
                "before_lease" => w.before_lease.iter().any(|(f, t)| *f == feature && *t < end + Duration::seconds(MAX_SKEW_SECS)),
                "reclaimed" => w.reclaims.iter().any(|t| *t < end + Duration::seconds(MAX_SKEW_SECS)),
                _ => false,
            };
            if !explained {
                let trail = window_trail(pg_url, &w.sub, &feature, start, end).await;
                return Err(format!(
                    "{feature} window {start}: used {used} > limit {lim} with cause {c:?}, which nothing in the schedule explains\n{trail}"
                ));
            }
        }
    }
    // 2. Exactly once.
    let server = usage_of(&w.http, &w.replicas[0].url, &w.sub).await;
    for f in ["chat", "img", "notes"] {
        let want = w.truth.get(f).copied().unwrap_or(0);
        let got = server.get(f).copied().unwrap_or(0);
        if want != got {
            return Err(format!("{f}: the server counts {got}, the devices and the backend were told {want} were recorded"));
        }
    }
    // 3. Liveness: two quiet syncs each, then one device asks for the whole daily pool.
    for _ in 0..2 {
        for i in 0..w.devices.len() {
            if !w.sync(i).await {
                return Err(format!("{} could not sync without faults", w.devices[i].name));
            }
        }
    }
    let now = now_of(w);
    let lim = limit(w.plan_at(now), "chat");
    let asker = w.rng.random_range(0..w.devices.len());
    let mut others = 0;
    let mut used = 0;
    let mut before = 0;
    for (i, d) in w.devices.iter().enumerate() {
        let u = d.tally.usage(&d.user, "chat").map_err(|e| e.to_string())?;
        used = u.used;
        if i != asker {
            others += u.device_remaining.unwrap_or(0);
        } else {
            before = u.device_remaining.unwrap_or(0);
        }
    }
    let d = &w.devices[asker];
    d.tally.prepare_offline(&d.user, "chat", lim).map_err(|e| e.to_string())?;
    if !w.sync(asker).await {
        return Err("the asking device could not sync".into());
    }
    let d = &w.devices[asker];
    let u = d.tally.usage(&d.user, "chat").map_err(|e| e.to_string())?;
    // It gets the room no other device holds, less what is kept free for other claiming
    // devices holding nothing (at most their equal part of it), and never more (a slice
    // granted under a higher limit before a downgrade may already be larger: it is kept, not
    // grown).
    let room = lim.saturating_sub(used).saturating_sub(others);
    let k = w.devices.len() as u64 - 1;
    let least = room - room * k / (k + 1);
    let holds = u.device_remaining.unwrap_or(0);
    if holds < least || holds > room.max(before) {
        return Err(format!(
            "liveness: {} asked for the whole pool (limit {lim}, used {used}, held by others {others}, by itself {before}) \
             and holds {holds}, expected {least} to {room}",
            d.name
        ));
    }
    Ok(())
}

/// Each feature's total of one account over all time, from the server's own report.
async fn usage_of(http: &reqwest::Client, url: &str, sub: &str) -> BTreeMap<String, u64> {
    let v: Value = http
        .get(format!("{url}/v1/usage?group_by=feature&from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z"))
        .bearer_auth(id_token(sub))
        .send()
        .await
        .expect("usage")
        .json()
        .await
        .expect("usage json");
    let rows = v.get("rows").cloned().unwrap_or(v);
    let mut out = BTreeMap::new();
    for r in rows.as_array().into_iter().flatten() {
        *out.entry(r["feature"].as_str().unwrap_or_default().to_string()).or_default() += r["amount"].as_u64().unwrap_or(0);
    }
    out
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn hard_limits_hold_across_offline_devices_backends_and_replicas() {
    let dir = tempfile::Builder::new().prefix("tally-leases-pg-").tempdir_in("/tmp").expect("tempdir");
    let Some(pg) = postgres(dir.path()) else { return };
    let cases = env_u64("TALLY_LEASE_CASES").unwrap_or(8);
    let steps = env_u64("TALLY_LEASE_STEPS").unwrap_or(150);
    let seed = env_u64("TALLY_LEASE_SEED").unwrap_or_else(|| rand::rng().random());
    eprintln!("lease simulation: {cases} cases × {steps} steps, TALLY_LEASE_SEED={seed}");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut causes_seen = BTreeSet::new();
        for case in 0..cases as usize {
            let case_seed = seed.wrapping_add(case as u64);
            let mut w = World::new(case_seed, &pg, case).await;
            for _ in 0..steps {
                w.step().await;
            }
            let url = w.db.clone();
            if let Err(e) = check(&mut w, &url).await {
                panic!("case {case} failed: {e}\nreplay with TALLY_LEASE_SEED={seed} (case seed {case_seed})");
            }
            for (_, _, _, c) in windows(&url, &w.sub).await {
                causes_seen.extend(c);
            }
            eprintln!("case {case}: {} devices at the end, {:?}", w.devices.len(), w.stats);
            let _ = std::fs::remove_dir_all(&w.dir);
        }
        eprintln!("lease simulation passed; causes seen: {causes_seen:?}");
    });
}

#[test]
fn one_device_alone_gets_the_whole_offline_share() {
    let dir = tempfile::Builder::new().prefix("tally-leases-pg-").tempdir_in("/tmp").expect("tempdir");
    let Some(pg) = postgres(dir.path()) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut w = World::new(7, &pg, 99).await;
        w.devices.truncate(1);
        // The app asks for both pools (a device claims only what it asks for or uses).
        let d = &w.devices[0];
        d.tally.prepare_offline(&d.user, "chat", 1).expect("prepare");
        d.tally.prepare_offline(&d.user, "img", 1).expect("prepare");
        assert!(w.sync(0).await, "first sync");
        let d = &w.devices[0];
        let chat = d.tally.usage(&d.user, "chat").expect("usage");
        let img = d.tally.usage(&d.user, "img").expect("usage");
        assert_eq!(chat.device_remaining, Some(12), "offline_share 1: the whole daily pool");
        assert_eq!(img.device_remaining, Some(4), "offline_share 0.5: half the hourly pool, the rest stays with the backend");
        // Spend the lease offline: the 13th use is refused by the limit, not the lease.
        for n in 0..12 {
            let dec = d.tally.consume(&d.user, "chat", 1, UsageMeta::default()).expect("consume");
            assert!(dec.allowed, "use {n}: {dec:?}");
        }
        let dec = d.tally.consume(&d.user, "chat", 1, UsageMeta::default()).expect("consume");
        assert_eq!((dec.allowed, dec.reason), (false, Reason::LimitReached));
        // The hourly pool: 4 here, then the lease is spent while the account has room.
        for _ in 0..4 {
            assert!(d.tally.consume(&d.user, "img", 1, UsageMeta::default()).expect("consume").allowed);
        }
        let dec = d.tally.consume(&d.user, "img", 1, UsageMeta::default()).expect("consume");
        assert_eq!((dec.allowed, dec.reason, dec.device_remaining), (false, Reason::LeaseExhausted, Some(0)));
        let _ = std::fs::remove_dir_all(&w.dir);
    });
}

#[test]
fn two_offline_devices_and_a_backend_never_spend_more_than_one_balance() {
    let dir = tempfile::Builder::new().prefix("tally-leases-pg-").tempdir_in("/tmp").expect("tempdir");
    let Some(pg) = postgres(dir.path()) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut w = World::new(11, &pg, 98).await;
        w.devices.truncate(2);
        let until = (now_of(&w) + Duration::days(60)).to_rfc3339();
        let (s, v) = w.admin("/v1/admin/grants", json!({"subject": w.sub, "credits": 100, "until": until, "reason": "pack"})).await;
        assert!(s < 300, "credit grant: {s} {v}");
        for d in &w.devices {
            d.tally.prepare_offline(&d.user, "gen", 1).expect("prepare");
        }
        // Both devices sync (twice each, so the first one gives back what the second needs).
        for _ in 0..2 {
            for i in 0..2 {
                assert!(w.sync(i).await);
            }
        }
        let held: Vec<u64> =
            w.devices.iter().map(|d| d.tally.usage(&d.user, "gen").expect("usage").device_remaining.expect("a $credits lease")).collect();
        assert!(held.iter().sum::<u64>() <= 100, "the devices hold {held:?} of a balance of 100");
        assert!(held.iter().all(|h| *h > 0), "both devices hold credits: {held:?}");
        // Offline: each device spends until its lease says no; the backend spends what is left.
        let mut spent = 0u64;
        for d in &w.devices {
            loop {
                let dec = d.tally.consume(&d.user, "gen", 1, UsageMeta::default()).expect("consume");
                if !dec.allowed {
                    assert!(matches!(dec.reason, Reason::LeaseExhausted | Reason::InsufficientCredits), "{dec:?}");
                    break;
                }
                spent += 1;
            }
        }
        loop {
            let r = w
                .http
                .post(format!("{}/v1/consume", w.replicas[1].url))
                .bearer_auth(id_token(&w.sub))
                .json(&json!({"feature": "gen", "amount": 1}))
                .send()
                .await
                .expect("consume");
            match r.status().as_u16() {
                200 => spent += 1,
                402 => break,
                s => panic!("backend consume answered {s}"),
            }
            assert!(spent <= 100, "spent {spent} of a balance of 100");
        }
        assert!(spent <= 100, "spent {spent} of a balance of 100 while the devices were offline");
        // Back online: everything counts once, and the balance is never negative.
        for _ in 0..2 {
            for i in 0..2 {
                assert!(w.sync(i).await);
            }
        }
        let total = usage_of(&w.http, &w.replicas[0].url, &w.sub).await.get("gen").copied().unwrap_or(0);
        assert_eq!(total, spent, "every use counted once");
        let ent: Value = w
            .http
            .get(format!("{}/v1/entitlements", w.replicas[0].url))
            .bearer_auth(id_token(&w.sub))
            .send()
            .await
            .expect("entitlements")
            .json()
            .await
            .expect("json");
        assert_eq!(ent["credit_balance"].as_i64(), Some(100 - spent as i64), "{ent}");
        // Liveness: what is left can still be spent, by the devices, to the last credit.
        for _ in 0..4 {
            for i in 0..2 {
                assert!(w.sync(i).await);
                let d = &w.devices[i];
                while d.tally.consume(&d.user, "gen", 1, UsageMeta::default()).expect("consume").allowed {
                    spent += 1;
                }
            }
        }
        for i in 0..2 {
            assert!(w.sync(i).await);
        }
        assert_eq!(spent, 100, "the whole balance is spendable, never more");
        assert_eq!(usage_of(&w.http, &w.replicas[0].url, &w.sub).await.get("gen").copied(), Some(100));
        let _ = std::fs::remove_dir_all(&w.dir);
    });
}

#[test]
fn credits_revoked_while_a_device_held_them_show_as_debt_caused_by_the_refund() {
    let dir = tempfile::Builder::new().prefix("tally-leases-pg-").tempdir_in("/tmp").expect("tempdir");
    let Some(pg) = postgres(dir.path()) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut w = World::new(13, &pg, 97).await;
        w.devices.truncate(1);
        let (s, v) = w.admin("/v1/admin/grants", json!({"subject": w.sub, "credits": 30, "reason": "pack"})).await;
        assert!(s < 300, "credit grant: {s} {v}");
        let d = &w.devices[0];
        d.tally.prepare_offline(&d.user, "gen", 1).expect("prepare");
        assert!(w.sync(0).await);
        let d = &w.devices[0];
        assert_eq!(d.tally.usage(&d.user, "gen").expect("usage").device_remaining, Some(30), "one device holds the whole balance");
        let (s, v) = w.admin("/v1/admin/grants/revoke", json!({"subject": w.sub, "credits": true})).await;
        assert!(s < 300, "revoke: {s} {v}");
        // Offline, the device spends the credits its lease still holds.
        let d = &w.devices[0];
        for n in 0..30 {
            assert!(d.tally.consume(&d.user, "gen", 1, UsageMeta::default()).expect("consume").allowed, "use {n}");
        }
        assert!(w.sync(0).await);
        let d = &w.devices[0];
        let u = d.tally.usage(&d.user, "gen").expect("usage");
        assert_eq!((u.remaining, u.over_limit_by), (Some(0), 30), "{u:?}");
        assert_eq!(u.over_limit_causes, vec!["refund".to_string()], "{u:?}");
        let _ = std::fs::remove_dir_all(&w.dir);
    });
}
