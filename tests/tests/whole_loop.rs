//! The whole loop as a property, through real parts: random **legal** device states — several
//! users on 2–3 devices (real SQLite files), settings of any legal size, profile edits,
//! metadata, amounts near the limits, AI fields — used offline, synced through a
//! [`FaultProxy`] that answers 5xx, loses answers after the server committed, delays, and caps
//! request bodies (at 64 KiB or more, so any single legal event or setting fits), then drained
//! through the same proxy without faults (the body cap stays: it is part of the path).
//!
//! Then, for every case:
//! 1. every sync after the faults stopped completed, and nothing is pending;
//! 2. for each user and feature, the server's total (`GET /v1/usage`) is the sum of the distinct
//!    uses recorded on all devices;
//! 3. each device's `usage()` equals the server's total of the current window (`POST /v1/check`);
//! 4. nothing legal was quarantined (every keyed event is `Settled`, no sync reported a
//!    rejection), and settings converged: the server's `GET /v1/settings` and every device's
//!    `settings()` (local-only keys aside) hold the last value written.
//!
//! Environment: `TALLY_LOOP_CASES` (default 20), `TALLY_LOOP_SEED` (replays a run; printed at
//! start and on failure), `TALLY_LOOP_SHRINK_SECS` (default 90: time spent looking for a
//! smaller failing case; 0: none). Needs PostgreSQL: fails, never skips, without it.

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use tally_core::{EventStatus, Profile, SyncOptions, UsageMeta, UserUpdate};
use tally_e2e::proxy::{FaultProxy, Faults};
use tally_e2e::*;

// The contract's limits (what both sides must accept). Every generated value stays within them.
use tally_core::contract::{
    MAX_AMOUNT, MAX_AVATAR_URL_BYTES, MAX_DISPLAY_NAME_BYTES, MAX_IDEMPOTENCY_KEY_BYTES, MAX_METADATA_BYTES, MAX_MODEL_BYTES,
    MAX_SETTING_KEY_BYTES, MAX_SETTING_VALUE_BYTES, MAX_SETTINGS_BYTES as MAX_SETTINGS_BYTES_PER_USER, MAX_TOKENS,
};

/// The smallest body cap the proxy draws (any single legal event or setting fits under it).
const MIN_BODY_CAP: usize = 64 * 1024;

/// Features of the harness catalog: unlimited per day, unlimited lifetime, hard 5 a month.
const FEATURES: [&str; 3] = ["notes", "lifetime_notes", "ai_chat"];
/// The harness devices' local-only setting key.
const LOCAL_KEY: &str = "theme";
/// The nil UUID, a legal idempotency key (no event id: it maps to a UUIDv5 like any other text).
const NIL: &str = "00000000-0000-0000-0000-000000000000";
/// Setting keys that several devices write (so last-writer-wins has work to do).
const SHARED_KEYS: [&str; 5] = ["lang", "font.size", "layout/sidebar", "über-ключ-設定", "k"];

// ---------------------------------------------------------------------------------------------
// Generated values. Large text is a recipe (size, alphabet, seed) so a failing case shrinks by
// size — towards the boundary that matters — instead of character by character.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alphabet {
    /// Printable ASCII.
    Ascii,
    /// 1- to 4-byte characters (accents, combining marks, CJK, emoji, RTL).
    Unicode,
    /// Characters JSON escapes (quotes, backslashes, control characters other than U+0000).
    Escapes,
}

#[derive(Clone, PartialEq, Eq)]
struct Text {
    bytes: usize,
    alphabet: Alphabet,
    seed: u64,
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Text({} bytes, {:?}, #{})", self.bytes, self.alphabet, self.seed)
    }
}

fn pick_char(rng: &mut StdRng, alphabet: Alphabet) -> char {
    const ESCAPES: [char; 12] = ['"', '\\', '\n', '\t', '\r', '\u{1}', '\u{1f}', '\u{7f}', '\u{2028}', '/', 'a', 'é'];
    let ranges: &[(u32, u32)] = match alphabet {
        Alphabet::Ascii => &[(0x20, 0x7e)],
        Alphabet::Unicode => &[(0x41, 0x7a), (0xe0, 0xff), (0x300, 0x36f), (0x5d0, 0x5ea), (0x4e00, 0x9fff), (0x1f600, 0x1f64f)],
        Alphabet::Escapes => return ESCAPES[rng.random_range(0..ESCAPES.len())],
    };
    let (lo, hi) = ranges[rng.random_range(0..ranges.len())];
    char::from_u32(rng.random_range(lo..=hi)).unwrap_or('x')
}

/// Bytes `c` takes inside a JSON string as serde_json writes it.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

impl Text {
    /// Text of exactly `min(self.bytes, max)` bytes by `measure` (UTF-8 or JSON-escaped size).
    fn build(&self, max: usize, measure: fn(char) -> usize, text_field: bool) -> String {
        let target = self.bytes.min(max);
        let mut rng = StdRng::seed_from_u64(self.seed);
        let alphabet = if text_field && self.alphabet == Alphabet::Escapes { Alphabet::Unicode } else { self.alphabet };
        let mut s = String::new();
        let mut size = 0;
        // Random characters while they fit; then ASCII to the exact size.
        while size < target {
            let mut c = pick_char(&mut rng, alphabet);
            if size + measure(c) > target {
                c = 'x';
            }
            size += measure(c);
            s.push(c);
        }
        s
    }

    /// Text for a text field (no control characters): exactly `min(bytes, max)` UTF-8 bytes.
    fn plain(&self, max: usize) -> String {
        self.build(max, char::len_utf8, true)
    }

    /// A string whose JSON form (quotes included) takes exactly `min(bytes, max)` bytes (≥ 2).
    fn json_string(&self, max: usize) -> String {
        Text { bytes: self.bytes.saturating_sub(2), ..self.clone() }.build(max.saturating_sub(2), json_len, false)
    }
}

fn alphabet() -> impl Strategy<Value = Alphabet> {
    prop_oneof![Just(Alphabet::Ascii), Just(Alphabet::Unicode), Just(Alphabet::Escapes)]
}

/// A size in `lo..=max`, often at or just below `max`.
fn size(lo: usize, max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![3 => lo..=max, 1 => lo..=lo.max(40).min(max), 2 => max.saturating_sub(64).max(lo)..=max, 1 => Just(max)]
}

fn text(lo: usize, max: usize) -> impl Strategy<Value = Text> {
    (size(lo, max), alphabet(), any::<u64>()).prop_map(|(bytes, alphabet, seed)| Text { bytes, alphabet, seed })
}

/// A JSON value of a given serialized size, or a delete.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ValueGen {
    Delete,
    Int(i64),
    /// `n / 4` as a float (exact in binary and decimal, so every store keeps it as written).
    Quarter(i32),
    Bool(bool),
    Str(Text),
    Object(Text),
    Array(Text, u8),
}

/// `f("")`'s serialized size minus the empty string's two quotes: what `f` adds around a string.
fn overhead(f: &dyn Fn(Vec<String>) -> Value, parts: usize) -> usize {
    serde_json::to_string(&f(vec![String::new(); parts])).map_or(0, |s| s.len()) - 2 * parts
}

/// Splits `s` into `n` pieces at character boundaries.
fn split(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let per = chars.len().div_ceil(n.max(1)).max(1);
    let mut out: Vec<String> = chars.chunks(per).map(|c| c.iter().collect()).collect();
    out.resize(n.max(1), String::new());
    out
}

/// A value built around strings whose total JSON form is `bytes` (capped at `max`).
fn shaped(t: &Text, max: usize, parts: usize, f: &dyn Fn(Vec<String>) -> Value) -> Value {
    let over = overhead(f, parts);
    let inner = Text { bytes: t.bytes.saturating_sub(over).saturating_sub(2 * (parts - 1)), ..t.clone() };
    // The JSON form of `s` is its content plus 2 quotes; each further piece adds 2 more.
    let s = inner.json_string(max.saturating_sub(over).saturating_sub(2 * (parts - 1)));
    f(split(&s, parts))
}

impl ValueGen {
    fn value(&self, max: usize) -> Option<Value> {
        Some(match self {
            ValueGen::Delete => return None,
            ValueGen::Int(n) => json!(n),
            ValueGen::Quarter(n) => json!(f64::from(*n) / 4.0),
            ValueGen::Bool(b) => json!(b),
            ValueGen::Str(t) => Value::String(t.json_string(max)),
            ValueGen::Object(t) => shaped(t, max, 1, &|mut v| json!({"text": v.remove(0), "n": 7, "nested": {"ok": true, "list": [1, 2]}})),
            ValueGen::Array(t, n) => shaped(t, max, usize::from(*n).max(1), &|v| Value::Array(v.into_iter().map(Value::String).collect())),
        })
    }
}

/// Event metadata: always an object (`{"m": value}` around a non-object value).
fn metadata(g: &ValueGen) -> Option<Value> {
    match g {
        ValueGen::Object(_) => g.value(MAX_METADATA_BYTES),
        _ => {
            let wrap = |v: Value| json!({ "m": v });
            let over = serde_json::to_string(&wrap(Value::Null)).map_or(0, |s| s.len()) - "null".len();
            g.value(MAX_METADATA_BYTES - over).map(wrap)
        }
    }
}

fn value_gen(max: usize) -> impl Strategy<Value = ValueGen> {
    prop_oneof![
        1 => Just(ValueGen::Delete),
        1 => any::<i64>().prop_map(ValueGen::Int),
        1 => any::<i32>().prop_map(ValueGen::Quarter),
        1 => any::<bool>().prop_map(ValueGen::Bool),
        4 => text(2, max).prop_map(ValueGen::Str),
        2 => text(2, max).prop_map(ValueGen::Object),
        2 => (text(2, max), 1u8..=16).prop_map(|(t, n)| ValueGen::Array(t, n)),
    ]
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SettingKey {
    Shared(usize),
    Local,
    Random(Text),
}

impl SettingKey {
    fn key(&self) -> String {
        match self {
            SettingKey::Shared(i) => SHARED_KEYS[i % SHARED_KEYS.len()].to_string(),
            SettingKey::Local => LOCAL_KEY.to_string(),
            SettingKey::Random(t) => {
                let k = t.plain(MAX_SETTING_KEY_BYTES);
                if k.is_empty() || k == LOCAL_KEY { "r".into() } else { k }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum IdKey {
    Text(Text),
    Uuid,
    /// The nil UUID (once per user; later ones become [`IdKey::Uuid`]).
    Nil,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Ai {
    /// `None`: the catalog's priced model.
    model: Option<Text>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Use {
    feature: usize,
    amount: u64,
    key: Option<IdKey>,
    ai: Option<Ai>,
    metadata: Option<ValueGen>,
    /// Consume the same key again right away (a replay: counts once).
    replay: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ProfileEdit {
    display_name: Option<Text>,
    avatar_url_bytes: Option<usize>,
    timezone: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    Consume(Use),
    /// One `patch_settings` of one or more keys.
    Set(Vec<(SettingKey, ValueGen)>),
    Profile(ProfileEdit),
    /// A sync through the faulty proxy (errors allowed while faults are on).
    Sync,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Op {
    user: usize,
    device: usize,
    action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Case {
    users: usize,
    devices: usize,
    ops: Vec<Op>,
    body_cap: usize,
    faults: Faults,
    proxy_seed: u64,
    max_batch_events: usize,
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 1..=10u64, 2 => 1..=MAX_AMOUNT, 2 => (MAX_AMOUNT - 1000)..=MAX_AMOUNT, 1 => Just(MAX_AMOUNT)]
}

fn tokens() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![Just(None), (0..=10_000u64).prop_map(Some), (0..=MAX_TOKENS).prop_map(Some), Just(Some(MAX_TOKENS))]
}

fn use_gen() -> impl Strategy<Value = Use> {
    let key = prop_oneof![3 => Just(None), 3 => Just(Some(IdKey::Uuid)), 1 => Just(Some(IdKey::Nil)), 10 => text(1, MAX_IDEMPOTENCY_KEY_BYTES).prop_map(|t| Some(IdKey::Text(t)))];
    let ai = proptest::option::of(
        (proptest::option::of(text(1, MAX_MODEL_BYTES)), tokens(), tokens()).prop_map(|(model, input_tokens, output_tokens)| Ai {
            model,
            input_tokens,
            output_tokens,
        }),
    );
    let metadata = proptest::option::of(value_gen(MAX_METADATA_BYTES));
    (0..FEATURES.len(), amount(), key, ai, metadata, proptest::bool::weighted(0.2))
        .prop_map(|(feature, amount, key, ai, metadata, replay)| Use { feature, amount, key, ai, metadata, replay })
}

fn setting_key() -> impl Strategy<Value = SettingKey> {
    prop_oneof![4 => (0..SHARED_KEYS.len()).prop_map(SettingKey::Shared), 1 => Just(SettingKey::Local), 2 => text(1, MAX_SETTING_KEY_BYTES).prop_map(SettingKey::Random)]
}

fn profile_edit() -> impl Strategy<Value = ProfileEdit> {
    (
        proptest::option::of(text(0, MAX_DISPLAY_NAME_BYTES)),
        proptest::option::of(size(0, MAX_AVATAR_URL_BYTES)),
        proptest::option::of(0..chrono_tz::TZ_VARIANTS.len()),
    )
        .prop_map(|(display_name, avatar_url_bytes, timezone)| ProfileEdit { display_name, avatar_url_bytes, timezone })
}

fn op() -> impl Strategy<Value = Op> {
    let action = prop_oneof![
        5 => use_gen().prop_map(Action::Consume),
        5 => prop_oneof![4 => proptest::collection::vec((setting_key(), value_gen(MAX_SETTING_VALUE_BYTES)), 1..=1), 1 => proptest::collection::vec((setting_key(), value_gen(MAX_SETTING_VALUE_BYTES)), 2..=12)].prop_map(Action::Set),
        1 => profile_edit().prop_map(Action::Profile),
        1 => Just(Action::Sync),
    ];
    (0..3usize, 0..3usize, action).prop_map(|(user, device, action)| Op { user, device, action })
}

fn faults() -> impl Strategy<Value = Faults> {
    (0..=30u8, 0..=30u8, 0..=30u8, 0..=200u64).prop_map(|(fail_pct, cut_pct, delay_pct, max_delay_ms)| Faults {
        fail_pct,
        cut_pct,
        delay_pct,
        max_delay_ms,
    })
}

fn case() -> impl Strategy<Value = Case> {
    let cap = prop_oneof![Just(MIN_BODY_CAP), MIN_BODY_CAP..=4 * MIN_BODY_CAP, MIN_BODY_CAP..=(1 << 20)];
    let batch = prop_oneof![Just(500usize), Just(64), 1..=8usize];
    (1..=3usize, 2..=3usize, proptest::collection::vec(op(), 1..=48), cap, faults(), any::<u64>(), batch).prop_map(
        |(users, devices, ops, body_cap, faults, proxy_seed, max_batch_events)| Case {
            users,
            devices,
            ops,
            body_cap,
            faults,
            proxy_seed,
            max_batch_events,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// The world: one Postgres, one server, shared by every case (each case has its own subjects
// and device files).

/// Dropped in field order: the server before Postgres, Postgres before its directory.
struct World {
    server: Server,
    keys: String,
    rt: tokio::runtime::Runtime,
    runs: AtomicU64,
    _pg: tally_server::pg_cluster::Cluster,
    dir: tempfile::TempDir,
}

fn world() -> World {
    let dir = tempfile::Builder::new().prefix("tally-loop-").tempdir_in("/tmp").expect("tempdir");
    let pg = postgres(dir.path())
        .unwrap_or_else(|| panic!("the whole-loop property needs PostgreSQL (initdb, pg_ctl): install it; this test never skips"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let db_url = rt.block_on(pg.create_database("whole_loop")).expect("create database");
    let server = Server::start(&db_url, &dir.path().join("server"), &[]);
    let keys = server.keys();
    World { server, keys, rt, runs: AtomicU64::new(0), _pg: pg, dir }
}

fn sync_options(url: &str, sub: &str, case: &Case) -> SyncOptions {
    let mut o = SyncOptions::new(url, id_token(sub));
    o.max_batch_events = case.max_batch_events;
    o.retry.max_attempts = 12;
    o.retry.initial_backoff = std::time::Duration::from_millis(5);
    o.retry.max_backoff = std::time::Duration::from_millis(100);
    o
}

/// The server's view of `feature` in its current window: (used, resets_at).
fn server_window(w: &World, sub: &str, feature: &str) -> Result<(u64, Option<DateTime<Utc>>), String> {
    let body = json!({"feature": feature, "amount": 1}).to_string();
    let (status, text) = raw_request("POST", &format!("{}/v1/check", w.server.url), Some(&id_token(sub)), Some(&body))
        .map_err(|e| format!("POST /v1/check: {e}"))?;
    if status != 200 {
        return Err(format!("POST /v1/check {feature}: {status} {text}"));
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("check answer: {e}"))?;
    let resets_at = serde_json::from_value(v["resets_at"].clone()).map_err(|e| format!("resets_at: {e}"))?;
    Ok((v["used"].as_u64().ok_or("no used")?, resets_at))
}

/// The server's all-time total of `feature` for `sub`, from its own report
/// (`GET /v1/usage?group_by=feature`).
fn server_total(w: &World, sub: &str, feature: &str) -> Result<u64, String> {
    let url = format!("{}/v1/usage?group_by=feature&from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z", w.server.url);
    let (status, text) = raw_request("GET", &url, Some(&id_token(sub)), None).map_err(|e| format!("GET /v1/usage: {e}"))?;
    if status != 200 {
        return Err(format!("GET /v1/usage: {status} {text}"));
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("usage answer: {e}"))?;
    let rows = v["rows"].as_array().ok_or_else(|| format!("usage answer without rows: {text}"))?;
    Ok(rows.iter().filter(|r| r["feature"] == feature).map(|r| r["amount"].as_u64().unwrap_or(0)).sum())
}

/// Every violation of the properties found in one case.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn add(&mut self, property: &str, what: String) {
        if self.0.len() < 40 {
            self.0.push(format!("[{property}] {what}"));
        }
    }
}

/// The expected state of one user, kept by the test as it drives the devices.
#[derive(Default)]
struct Expect {
    totals: BTreeMap<&'static str, u64>,
    keyed: Vec<(usize, String)>,
    /// Last value written per synced key (`None` = deleted).
    settings: BTreeMap<String, Option<Value>>,
    /// Last local-only value per device.
    local: BTreeMap<usize, Option<Value>>,
    settings_bytes: usize,
    used_nil: bool,
}

fn run_case(w: &World, case: &Case) -> Result<(), TestCaseError> {
    let run = w.runs.fetch_add(1, Ordering::SeqCst);
    let proxy = FaultProxy::start(&w.server.url, case.body_cap, case.proxy_seed);
    proxy.set_faults(case.faults);
    let devices: Vec<Device> = (0..case.devices)
        .map(|d| device(&w.dir.path().join(format!("r{run}-d{d}.db")), &format!("loop-r{run}-d{d}"), &w.keys, Utc::now()))
        .collect();
    let subs: Vec<String> = (0..case.users).map(|u| format!("loop-r{run}-u{u}")).collect();
    // ids[u][d]: user u's local id on device d.
    let ids: Vec<Vec<String>> = subs
        .iter()
        .map(|sub| {
            devices
                .iter()
                .map(|d| {
                    let p = Profile { external_id: sub.clone(), email: Some(format!("{sub}@example.com")), ..Profile::default() };
                    d.tally.sign_in(p, None).expect("sign in").id
                })
                .collect()
        })
        .collect();
    let mut expect: Vec<Expect> = (0..case.users).map(|_| Expect::default()).collect();
    let mut f = Findings::default();
    let mut rejected: Vec<String> = Vec::new();
    let mut fault_errors = 0;

    for (i, op) in case.ops.iter().enumerate() {
        let (u, d) = (op.user % case.users, op.device % case.devices);
        let dev = &devices[d];
        // Real time, 2 ms apart: the last write in op order has the highest HLC.
        std::thread::sleep(std::time::Duration::from_millis(2));
        dev.clock.set(Utc::now());
        let uid = &ids[u][d];
        match &op.action {
            Action::Consume(c) => {
                let feature = FEATURES[c.feature];
                let amount = if feature == "ai_chat" { 1 + c.amount % 2 } else { c.amount };
                let key = match &c.key {
                    None => None,
                    Some(IdKey::Nil) if !expect[u].used_nil => {
                        expect[u].used_nil = true;
                        Some(NIL.to_string())
                    }
                    Some(IdKey::Uuid | IdKey::Nil) => {
                        // Never the nil UUID itself (run 0, op 0, user 0 would be): that is the
                        // other key, and two uses under one key are a conflict, rightly.
                        Some(uuid::Uuid::from_u128((run as u128 + 1) << 64 | (i as u128) << 8 | u as u128).to_string())
                    }
                    Some(IdKey::Text(t)) => {
                        let mut k = format!("{i}:{}", t.plain(MAX_IDEMPOTENCY_KEY_BYTES));
                        while k.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                            k.pop();
                        }
                        Some(k)
                    }
                };
                let meta = UsageMeta {
                    idempotency_key: key.clone(),
                    model: c
                        .ai
                        .as_ref()
                        .map(|a| a.model.as_ref().map_or("gpt-4o".into(), |m| m.plain(MAX_MODEL_BYTES)))
                        .filter(|m| !m.is_empty()),
                    input_tokens: c.ai.as_ref().and_then(|a| a.input_tokens),
                    output_tokens: c.ai.as_ref().and_then(|a| a.output_tokens),
                    metadata: c.metadata.as_ref().and_then(metadata),
                };
                let size = meta.metadata.as_ref().map_or(0, |m| m.to_string().len());
                assert!(size <= MAX_METADATA_BYTES, "harness: metadata of {size} bytes");
                match dev.tally.consume(uid, feature, amount, meta.clone()) {
                    // The nil UUID may be refused up front (then nothing is recorded, and the
                    // server is never asked); everything else generated here is legal.
                    Err(tally_core::Error::InvalidInput(_)) if key.as_deref() == Some(NIL) => {}
                    Err(e) => f.add("legal", format!("op {i}: the core refused a legal use of {feature} ×{amount}: {e}")),
                    Ok(dec) if dec.allowed => {
                        *expect[u].totals.entry(feature).or_default() += amount;
                        if let Some(k) = &key {
                            expect[u].keyed.push((d, k.clone()));
                            if c.replay {
                                match dev.tally.consume(uid, feature, amount, meta) {
                                    Ok(again) if again == dec => {}
                                    other => f.add("legal", format!("op {i}: replaying key {k:?} answered {other:?}, not {dec:?}")),
                                }
                            }
                        }
                    }
                    Ok(_) => {} // a hard limit denied it: nothing recorded
                }
            }
            Action::Set(writes) => {
                // One patch of several keys: an app that saves a whole preferences screen.
                let mut patch = Map::new();
                let mut applied = Vec::new();
                for (k, v) in writes {
                    let key = k.key();
                    let value = v.value(MAX_SETTING_VALUE_BYTES);
                    let size = value.as_ref().map_or(4, |v| v.to_string().len());
                    assert!(size <= MAX_SETTING_VALUE_BYTES && key.len() <= MAX_SETTING_KEY_BYTES, "harness: setting of {size} bytes");
                    // Stay far inside the per-user cap on settings, whatever the other devices wrote.
                    if key != LOCAL_KEY {
                        if expect[u].settings_bytes + key.len() + size > MAX_SETTINGS_BYTES_PER_USER * 3 / 4 {
                            continue;
                        }
                        expect[u].settings_bytes += key.len() + size;
                    }
                    patch.insert(key.clone(), value.clone().unwrap_or(Value::Null));
                    applied.push((key, value));
                }
                if patch.is_empty() {
                    continue;
                }
                let sizes: Vec<usize> = patch.values().map(|v| v.to_string().len()).collect();
                match dev.tally.patch_settings(uid, patch) {
                    Err(e) => f.add("legal", format!("op {i}: the core refused legal settings of {sizes:?} bytes: {e}")),
                    Ok(()) => {
                        for (key, value) in applied {
                            if key == LOCAL_KEY {
                                expect[u].local.insert(d, value);
                            } else {
                                expect[u].settings.insert(key, value);
                            }
                        }
                    }
                }
            }
            Action::Profile(p) => {
                let update = UserUpdate {
                    display_name: p.display_name.as_ref().map(|t| t.plain(MAX_DISPLAY_NAME_BYTES)),
                    avatar_url: p.avatar_url_bytes.map(|n| {
                        let base = "https://example.com/a/";
                        format!("{base}{}", "x".repeat(n.min(MAX_AVATAR_URL_BYTES).saturating_sub(base.len())))
                    }),
                    timezone: p.timezone.map(|i| chrono_tz::TZ_VARIANTS[i].name().to_string()),
                    email: None,
                };
                let desc = format!(
                    "display_name {:?} bytes / {:?} chars, avatar_url {:?} bytes, timezone {:?}",
                    update.display_name.as_ref().map(String::len),
                    update.display_name.as_ref().map(|s| s.chars().count()),
                    update.avatar_url.as_ref().map(String::len),
                    update.timezone
                );
                if let Err(e) = dev.tally.update_user(uid, update) {
                    f.add("legal", format!("op {i}: the core refused a legal profile edit ({desc}): {e}"));
                }
            }
            Action::Sync => match w.rt.block_on(dev.tally.sync(uid, sync_options(&proxy.url, &subs[u], case))) {
                Ok(r) => rejected.extend(r.rejected.iter().map(|x| format!("op {i} user {u} device {d}: {} {}", x.id, x.reason))),
                Err(_) => fault_errors += 1,
            },
        }
    }

    // Every device syncs once more while the faults go on.
    for u in 0..case.users {
        for (d, dev) in devices.iter().enumerate() {
            dev.clock.set(Utc::now());
            match w.rt.block_on(dev.tally.sync(&ids[u][d], sync_options(&proxy.url, &subs[u], case))) {
                Ok(r) => rejected.extend(r.rejected.iter().map(|x| format!("faulty round, user {u} device {d}: {} {}", x.id, x.reason))),
                Err(_) => fault_errors += 1,
            }
        }
    }
    // The faults stop; the path (and its body cap) stays. Two rounds: the first sends
    // everything, the second brings every device what the others sent.
    proxy.set_faults(Faults::CLEAN);
    for round in 0..2 {
        for u in 0..case.users {
            for (d, dev) in devices.iter().enumerate() {
                dev.clock.set(Utc::now());
                match w.rt.block_on(dev.tally.sync(&ids[u][d], sync_options(&proxy.url, &subs[u], case))) {
                    Ok(r) => rejected
                        .extend(r.rejected.iter().map(|x| format!("final round {round} user {u} device {d}: {} {}", x.id, x.reason))),
                    Err(e) => f.add("1 sync completes", format!("round {round}, user {u}, device {d}: {e}")),
                }
            }
        }
    }

    for u in 0..case.users {
        let sub = &subs[u];
        for (d, dev) in devices.iter().enumerate() {
            let pending = dev.tally.pending_events(&ids[u][d]).unwrap_or(u64::MAX);
            if pending != 0 {
                f.add("1 sync completes", format!("user {u}, device {d}: {pending} events still pending"));
            }
        }
        // 2. Server total = the distinct uses.
        for feature in FEATURES {
            let want = expect[u].totals.get(feature).copied().unwrap_or(0);
            let got = server_total(w, sub, feature);
            if got != Ok(want) {
                f.add("2 server total", format!("user {u}, {feature}: the server counts {got:?}, the devices recorded {want}"));
            }
        }
        // 3. Each device shows the server's current window.
        for (d, dev) in devices.iter().enumerate() {
            for feature in FEATURES {
                let mut last = String::new();
                let mut ok = false;
                for _attempt in 0..3 {
                    dev.clock.set(Utc::now());
                    let local = dev.tally.usage(&ids[u][d], feature);
                    let remote = server_window(w, sub, feature);
                    match (local, remote) {
                        (Ok(l), Ok((used, resets_at))) if l.used == used && l.resets_at == resets_at => {
                            ok = true;
                            break;
                        }
                        (Ok(l), Ok((used, resets_at))) if l.resets_at != resets_at => {
                            // A window boundary passed between the two reads: sync and look again.
                            last = format!("device window ends {:?}, server's {resets_at:?} (used {} vs {used})", l.resets_at, l.used);
                            let _ = w.rt.block_on(dev.tally.sync(&ids[u][d], sync_options(&proxy.url, sub, case)));
                        }
                        (l, r) => {
                            last = format!("device {l:?}, server {r:?}");
                            break;
                        }
                    }
                }
                if !ok {
                    f.add("3 device usage = server total", format!("user {u}, device {d}, {feature}: {last}"));
                }
            }
        }
        // 4. Nothing legal quarantined.
        for (d, key) in &expect[u].keyed {
            match devices[*d].tally.event_status(&ids[u][*d], key) {
                Ok(EventStatus::Settled) => {}
                other => f.add("4 nothing quarantined", format!("user {u}, device {d}, key of {} bytes: {other:?}", key.len())),
            }
        }
        // 4. Settings converge on the last value written.
        let want: Map<String, Value> = expect[u].settings.iter().filter_map(|(k, v)| Some((k.clone(), v.clone()?))).collect();
        let server: Value = match raw_request("GET", &format!("{}/v1/settings", w.server.url), Some(&id_token(sub)), None) {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
            other => {
                f.add("4 settings converge", format!("user {u}: GET /v1/settings answered {other:?}"));
                Value::Null
            }
        };
        let server = server.get("settings").and_then(Value::as_object).cloned().unwrap_or_default();
        if server != want {
            f.add("4 settings converge", format!("user {u}: server {}", diff(&server, &want)));
        }
        for (d, dev) in devices.iter().enumerate() {
            let mut got = dev.tally.settings(&ids[u][d]).unwrap_or_default();
            let local = got.remove(LOCAL_KEY);
            if got != want {
                f.add("4 settings converge", format!("user {u}, device {d}: {}", diff(&got, &want)));
            }
            if local != expect[u].local.get(&d).cloned().flatten() {
                f.add("4 settings converge", format!("user {u}, device {d}: the local-only key changed: {local:?}"));
            }
        }
    }
    for r in rejected.iter().take(10) {
        f.add("4 nothing quarantined", format!("a sync rejected {r}"));
    }
    let s = proxy.stats();
    eprintln!(
        "whole_loop case {run}: {} users, {} devices, {} ops, cap {} B, faults {:?}; proxy {:?}; {} syncs failed under faults; {} findings",
        case.users,
        case.devices,
        case.ops.len(),
        case.body_cap,
        case.faults,
        s,
        fault_errors,
        f.0.len()
    );
    for finding in f.0.iter().take(8) {
        eprintln!("    {}", finding.chars().take(300).collect::<String>());
    }
    drop(devices);
    if f.0.is_empty() { Ok(()) } else { Err(TestCaseError::fail(f.0.join("\n"))) }
}

/// What differs between two settings maps, shortly (values by size).
fn diff(got: &Map<String, Value>, want: &Map<String, Value>) -> String {
    let short = |v: Option<&Value>| {
        v.map(|v| {
            let s = v.to_string();
            if s.len() > 40 { format!("<{} bytes>", s.len()) } else { s }
        })
    };
    let mut out = Vec::new();
    for k in got.keys().chain(want.keys().filter(|k| !got.contains_key(*k))) {
        let (g, w) = (got.get(k), want.get(k));
        if g != w {
            out.push(format!("{k:?}: has {:?}, expected {:?}", short(g), short(w)));
        }
    }
    out.join("; ")
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn random_legal_device_states_always_sync_to_the_same_totals() {
    let cases = env_u64("TALLY_LOOP_CASES").unwrap_or(20) as u32;
    let seed = env_u64("TALLY_LOOP_SEED").unwrap_or_else(|| rand::rng().random());
    let shrink_secs = env_u64("TALLY_LOOP_SHRINK_SECS").unwrap_or(90) as u32;
    eprintln!("whole_loop: {cases} cases, seed {seed} (replay with TALLY_LOOP_SEED={seed})");
    let w = world();
    let config = RunnerConfig {
        cases,
        failure_persistence: None,
        max_shrink_time: shrink_secs.saturating_mul(1000),
        max_shrink_iters: if shrink_secs == 0 { 0 } else { 1000 },
        ..RunnerConfig::default()
    };
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let started = std::time::Instant::now();
    let result = runner.run(&case(), |c| run_case(&w, &c));
    eprintln!("whole_loop: {} runs in {:?}", w.runs.load(Ordering::SeqCst), started.elapsed());
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, minimal)) => {
            panic!(
                "whole-loop property failed (seed {seed}; replay with TALLY_LOOP_SEED={seed})\n{why}\nsmallest failing case found:\n{minimal:#?}"
            )
        }
        Err(TestError::Abort(why)) => panic!("whole-loop property aborted (seed {seed}): {why}"),
    }
}
