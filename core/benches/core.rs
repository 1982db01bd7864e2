//! Core benchmarks: quota decisions and ledger writes, each beside a raw-SQLite baseline measured
//! in the same run on the same machine (see issue 8 and `scripts/bench`).
//!
//! Criterion reports means; the figures written for `scripts/bench` are percentiles from an HDR
//! histogram of individual operations, measured with ours and the baseline interleaved in rounds
//! so that drift (other processes, page cache, thermal) hits both alike.
//!
//! Environment:
//! - `TALLY_BENCH_OUT`   — file to write the results (JSON lines); default `target/bench-core.jsonl`
//! - `TALLY_BENCH_QUICK` — `1`: fewer iterations, no 1,000,000-event fixture
//! - `TALLY_BENCH_NO_CRITERION` — `1`: skip criterion's own (mean) estimates

use criterion::Criterion;
use hdrhistogram::Histogram;
use rusqlite::{Connection, params};
use serde_json::{Value, json};
use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use tally_core::{Catalog, Config, ConsumeItem, Durability, Tally, UsageMeta};

const CATALOG: &str = r#"{"plans":[{"id":"free","features":{
  "chat": {"type":"metered","limit":1000000000000,"period":"month","enforcement":"hard"},
  "notes":{"type":"metered","limit":null,"period":"day","enforcement":"hard"}}}]}"#;

/// The raw baseline table: the same columns and primary key as the core's `events`.
const RAW_TABLE: &str = "CREATE TABLE IF NOT EXISTS raw_events (
    user_id TEXT NOT NULL, id TEXT NOT NULL, feature TEXT NOT NULL, amount INTEGER NOT NULL,
    occurred_at INTEGER NOT NULL, device_id TEXT NOT NULL, device_seq INTEGER NOT NULL,
    decision TEXT NOT NULL, status INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (user_id, id)) WITHOUT ROWID";
const RAW_INSERT: &str = "INSERT INTO raw_events (user_id, id, feature, amount, occurred_at, device_id, device_seq, decision) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
const DECISION_JSON: &str = r#"{"allowed":true,"reason":"ok","used":1,"limit":1000000000000,"remaining":999999999999,"resets_at":"2026-01-01T00:00:00Z","access_reason":"free","over_limit_by":0}"#;

struct Run {
    quick: bool,
    lines: Vec<Value>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

fn pct(h: &Histogram<u64>) -> Value {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({"p50_us": us(0.5), "p90_us": us(0.9), "p99_us": us(0.99), "p999_us": us(0.999), "max_us": h.max() as f64 / 1000.0, "count": h.len()})
}

/// Times `n` calls of `f` into `h` (after `n / 10` warm-up calls when `warm`).
fn sample(h: &mut Histogram<u64>, n: usize, warm: bool, mut f: impl FnMut()) {
    if warm {
        for _ in 0..n / 10 {
            f();
        }
    }
    for _ in 0..n {
        let t = Instant::now();
        f();
        let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
    }
}

/// Runs ours and the baseline alternately for `rounds` rounds of `n` operations each.
fn interleaved(rounds: usize, n: usize, mut ours: impl FnMut(), mut base: impl FnMut()) -> (Histogram<u64>, Histogram<u64>) {
    let (mut ho, mut hb) = (hist(), hist());
    for _ in 0..rounds {
        sample(&mut hb, n, true, &mut base);
        sample(&mut ho, n, true, &mut ours);
    }
    (ho, hb)
}

impl Run {
    fn measurement(&mut self, name: &str, value: f64, unit: &str, h: Option<&Histogram<u64>>) {
        let mut v = json!({"kind": "measurement", "name": name, "value": value, "unit": unit});
        if let Some(h) = h {
            v["percentiles"] = pct(h);
        }
        eprintln!("  {name:<32} {value:>14.3} {unit}");
        self.lines.push(v);
    }

    #[allow(clippy::too_many_arguments)]
    fn result(
        &mut self,
        name: &str,
        value: f64,
        unit: &str,
        baseline: Option<(&str, f64)>,
        target: &str,
        met: Option<bool>,
        h: Option<&Histogram<u64>>,
    ) {
        let ratio = baseline.map(|(_, b)| if b > 0.0 { value / b } else { f64::NAN });
        let mut v = json!({
            "kind": "result", "name": name, "value": value, "unit": unit,
            "baseline_name": baseline.map(|b| b.0), "baseline_value": baseline.map(|b| b.1),
            "ratio": ratio, "target": target, "met": met,
        });
        if let Some(h) = h {
            v["percentiles"] = pct(h);
        }
        eprintln!(
            "  {name:<32} {value:>14.3} {unit:<10} baseline {:<32} {:>12.3}  ratio {:>7.3}  target: {target}  {}",
            baseline.map_or("—", |b| b.0),
            baseline.map_or(f64::NAN, |b| b.1),
            ratio.unwrap_or(f64::NAN),
            match met {
                Some(true) => "MET",
                Some(false) => "MISSED",
                None => "",
            }
        );
        self.lines.push(v);
    }
}

fn config(durability: Durability) -> Config {
    Config { catalog: Catalog::from_json(CATALOG).expect("bench catalog"), durability, ..Config::default() }
}

fn raw_conn(path: &Path, synchronous: &str) -> Connection {
    let c = Connection::open(path).expect("open raw");
    let mode: String = c.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).expect("wal");
    assert!(mode.eq_ignore_ascii_case("wal"));
    c.execute_batch(&format!("PRAGMA synchronous = {synchronous};")).expect("pragmas");
    c.execute_batch(RAW_TABLE).expect("raw table");
    c
}

fn raw_insert_one(c: &mut Connection, user: &str, seq: &mut i64) {
    *seq += 1;
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).expect("begin");
    tx.prepare_cached(RAW_INSERT)
        .expect("prepare")
        .execute(params![
            user,
            uuid::Uuid::now_v7().to_string(),
            "chat",
            1i64,
            chrono::Utc::now().timestamp_millis(),
            "bench-device",
            *seq,
            DECISION_JSON
        ])
        .expect("insert");
    tx.commit().expect("commit");
}

/// The least one consume writes in the core's own schema, by hand-written SQL on a database
/// `Tally::open` made: its event row (appended in device order, no index written; its counter
/// is written later, with 63 others), in one immediate transaction. What a consume costs above
/// this is the core's own work.
fn raw_floor_one(c: &mut Connection, user: &str, seq: &mut i64, period_start: i64) {
    *seq += 1;
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).expect("begin");
    tx.prepare_cached(
        "INSERT INTO events (device_seq, user_id, id, feature, amount, occurred_at, device_id, decision, status, indexed, count_period, count_start, count_amount) \
         VALUES (?1, ?2, ?3, 'chat', 1, ?4, 'bench-device', '', 0, 0, 'month', ?5, 1)",
    )
    .expect("prepare")
    .execute(params![*seq, user, uuid::Uuid::now_v7().to_string(), chrono::Utc::now().timestamp_millis(), period_start])
    .expect("insert event");
    tx.commit().expect("commit");
}

fn raw_insert_many(c: &mut Connection, user: &str, seq: &mut i64, n: usize) {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).expect("begin");
    {
        let mut st = tx.prepare_cached(RAW_INSERT).expect("prepare");
        let now = chrono::Utc::now().timestamp_millis();
        for _ in 0..n {
            *seq += 1;
            st.execute(params![user, uuid::Uuid::now_v7().to_string(), "chat", 1i64, now, "bench-device", *seq, DECISION_JSON])
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
}

/// WAL frames (pages written) per commit of `f`, counted over `n` commits: the WAL is
/// truncated first, then `PRAGMA wal_checkpoint(PASSIVE)` reports the frames in it (`n` small
/// enough that no automatic checkpoint restarts it).
fn wal_pages_per_commit(path: &Path, n: usize, mut f: impl FnMut()) -> f64 {
    let side = Connection::open(path).expect("open side connection");
    let frames = |mode: &str| -> i64 { side.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get(1)).expect("checkpoint") };
    frames("TRUNCATE");
    for _ in 0..n {
        f();
    }
    let written = frames("PASSIVE");
    frames("TRUNCATE");
    written as f64 / n as f64
}

fn items(n: usize) -> Vec<ConsumeItem> {
    (0..n).map(|_| ConsumeItem { feature: "chat".into(), amount: 1, meta: UsageMeta::default() }).collect()
}

fn main() {
    let quick = std::env::var("TALLY_BENCH_QUICK").is_ok_and(|v| v == "1");
    let use_criterion = !std::env::var("TALLY_BENCH_NO_CRITERION").is_ok_and(|v| v == "1");
    let out_path =
        std::env::var("TALLY_BENCH_OUT").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench-core.jsonl").to_string());
    let mut run = Run { quick, lines: Vec::new() };
    let mut crit = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(if quick { 700 } else { 1500 }))
        .sample_size(20)
        .without_plots();
    let dir = tempfile::tempdir().expect("temp dir");
    let k = if quick { 1 } else { 3 };
    eprintln!("core benchmarks ({} mode), files under {}", if quick { "quick" } else { "full" }, dir.path().display());

    // ---------------------------------------------------------------- check
    let path = dir.path().join("core.db");
    let tally = Tally::open(&path, config(Durability::Normal)).expect("open");
    let user = tally.create_local_user(Some("bench")).expect("user").id;
    tally.consume_many(&user, &items(100)).expect("seed");
    let raw_read = Connection::open(&path).expect("open raw reader");
    let (period_start,): (i64,) = raw_read
        .query_row("SELECT period_start FROM counters WHERE user_id = ?1 AND feature = 'chat' AND period = 'month'", [&user], |r| {
            Ok((r.get(0)?,))
        })
        .expect("counter row");
    let raw_select = |c: &Connection| -> (i64, i64, i64) {
        c.prepare_cached("SELECT pending, pending_cost, server_used FROM counters WHERE user_id = ?1 AND feature = ?2 AND period = ?3 AND period_start = ?4")
            .expect("prepare")
            .query_row(params![user, "chat", "month", period_start], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("select")
    };
    let (h_check, h_sel) = interleaved(
        5 * k,
        40_000,
        || {
            black_box(tally.check(&user, "chat", 1).expect("check"));
        },
        || {
            black_box(raw_select(&raw_read));
        },
    );
    let check_p50 = h_check.value_at_quantile(0.5) as f64 / 1000.0;
    let sel_p50 = h_sel.value_at_quantile(0.5) as f64 / 1000.0;
    run.measurement("raw.sqlite_select_pk_p50", sel_p50, "µs", Some(&h_sel));
    run.result(
        "core.check_p50",
        check_p50,
        "µs",
        Some(("raw.sqlite_select_pk_p50", sel_p50)),
        "p50 ≤ 5 µs and ratio ≤ 2.0",
        Some(check_p50 <= 5.0 && check_p50 / sel_p50 <= 2.0),
        Some(&h_check),
    );
    if use_criterion {
        let mut g = crit.benchmark_group("core.check");
        g.bench_function("tally_check", |b| b.iter(|| tally.check(&user, "chat", 1).expect("check")));
        g.bench_function("raw_select_pk", |b| b.iter(|| raw_select(&raw_read)));
        g.finish();
    }

    // ---------------------------------------------------------------- consume (Normal)
    let raw_path = dir.path().join("raw-normal.db");
    let mut raw = raw_conn(&raw_path, "NORMAL");
    let mut seq = 0i64;
    let (h_consume, h_ins) = interleaved(
        5 * k,
        if quick { 1_000 } else { 3_000 },
        || {
            black_box(tally.consume(&user, "chat", 1, UsageMeta::default()).expect("consume"));
        },
        || raw_insert_one(&mut raw, &user, &mut seq),
    );
    let (c50, i50) = (h_consume.value_at_quantile(0.5) as f64 / 1000.0, h_ins.value_at_quantile(0.5) as f64 / 1000.0);
    run.measurement("raw.sqlite_insert_normal_p50", i50, "µs", Some(&h_ins));
    run.result(
        "core.consume_p50",
        c50,
        "µs",
        Some(("raw.sqlite_insert_normal_p50", i50)),
        "ratio ≤ 1.5",
        Some(c50 / i50 <= 1.5),
        Some(&h_consume),
    );
    // Pages written per commit (deterministic: the same on any machine).
    let core_pages = wal_pages_per_commit(&path, 100, || {
        black_box(tally.consume(&user, "chat", 1, UsageMeta::default()).expect("consume"));
    });
    let raw_pages = wal_pages_per_commit(&raw_path, 100, || raw_insert_one(&mut raw, &user, &mut seq));
    run.measurement("raw.sqlite_insert_wal_pages", raw_pages, "pages/commit", None);
    run.measurement("core.consume_wal_pages", core_pages, "pages/commit", None);
    // The schema's floor: what the writes of one consume cost without the core around them.
    let floor_path = dir.path().join("floor.db");
    let (floor_user, floor_start) = {
        let t = Tally::open(&floor_path, config(Durability::Normal)).expect("open floor db");
        let u = t.create_local_user(Some("floor")).expect("user").id;
        t.consume_many(&u, &items(100)).expect("seed");
        let start: i64 = Connection::open(&floor_path)
            .expect("open")
            .query_row(
                "SELECT count_start FROM events WHERE user_id = ?1 AND feature = 'chat' AND count_period = 'month' LIMIT 1",
                [&u],
                |r| r.get(0),
            )
            .expect("the window of a recorded use");
        (u, start)
    };
    let mut floor = raw_conn(&floor_path, "NORMAL");
    let mut floor_seq = 1_000_000i64;
    let (h_floor, h_ins2) = interleaved(
        5 * k,
        if quick { 1_000 } else { 3_000 },
        || raw_floor_one(&mut floor, &floor_user, &mut floor_seq, floor_start),
        || raw_insert_one(&mut raw, &user, &mut seq),
    );
    let (f50, i50b) = (h_floor.value_at_quantile(0.5) as f64 / 1000.0, h_ins2.value_at_quantile(0.5) as f64 / 1000.0);
    run.result(
        "raw.sqlite_consume_floor_p50",
        f50,
        "µs",
        Some(("raw.sqlite_insert_normal_p50", i50b)),
        "report (the schema's own floor: one event row appended in device order, by hand)",
        None,
        Some(&h_floor),
    );
    run.measurement("core.consume_over_floor", c50 / f50, "×", None);
    let floor_pages = wal_pages_per_commit(&floor_path, 100, || raw_floor_one(&mut floor, &floor_user, &mut floor_seq, floor_start));
    run.measurement("raw.sqlite_consume_floor_wal_pages", floor_pages, "pages/commit", None);
    if use_criterion {
        let mut g = crit.benchmark_group("core.consume");
        g.bench_function("tally_consume_normal", |b| b.iter(|| tally.consume(&user, "chat", 1, UsageMeta::default()).expect("consume")));
        g.bench_function("raw_insert_normal", |b| b.iter(|| raw_insert_one(&mut raw, &user, &mut seq)));
        g.finish();
    }

    // ---------------------------------------------------------------- consume_many (Normal)
    let batch = items(1000);
    let (rounds, per) = if quick { (2, 5) } else { (4, 10) };
    let (h_many, h_bulk) = interleaved(
        rounds,
        per,
        || {
            black_box(tally.consume_many(&user, &batch).expect("consume_many"));
        },
        || raw_insert_many(&mut raw, &user, &mut seq, 1000),
    );
    let eps = |h: &Histogram<u64>| 1000.0 / (h.mean() / 1e9);
    let (m_eps, b_eps) = (eps(&h_many), eps(&h_bulk));
    run.measurement("raw.sqlite_bulk_insert_eps", b_eps, "events/s", Some(&h_bulk));
    run.result(
        "core.consume_many_eps",
        m_eps,
        "events/s",
        Some(("raw.sqlite_bulk_insert_eps", b_eps)),
        "≥ 300,000 events/s and ratio ≥ 0.5",
        Some(m_eps >= 300_000.0 && m_eps / b_eps >= 0.5),
        Some(&h_many),
    );
    drop(raw);
    drop(tally);

    // ---------------------------------------------------------------- consume (Full)
    let full_path = dir.path().join("core-full.db");
    let tally_full = Tally::open(&full_path, config(Durability::Full)).expect("open full");
    let user_full = tally_full.create_local_user(Some("bench-full")).expect("user").id;
    let mut raw_full = raw_conn(&dir.path().join("raw-full.db"), "FULL");
    let (h_cf, h_if) = interleaved(
        3 * k,
        if quick { 100 } else { 200 },
        || {
            black_box(tally_full.consume(&user_full, "chat", 1, UsageMeta::default()).expect("consume"));
        },
        || raw_insert_one(&mut raw_full, &user_full, &mut seq),
    );
    let (cf50, if50) = (h_cf.value_at_quantile(0.5) as f64 / 1000.0, h_if.value_at_quantile(0.5) as f64 / 1000.0);
    run.measurement("raw.sqlite_insert_full_p50", if50, "µs", Some(&h_if));
    run.result(
        "core.consume_full_p50",
        cf50,
        "µs",
        Some(("raw.sqlite_insert_full_p50", if50)),
        "ratio ≤ 1.3",
        Some(cf50 / if50 <= 1.3),
        Some(&h_cf),
    );
    drop(tally_full);
    drop(raw_full);

    // ---------------------------------------------------------------- 1,000,000-event ledger
    if !quick {
        let big = dir.path().join("ledger-1m.db");
        let t = Instant::now();
        let big_user = {
            let tb = Tally::open(&big, config(Durability::Normal)).expect("open 1m");
            let u = tb.create_local_user(Some("heavy")).expect("user").id;
            let chunk = items(20_000);
            for _ in 0..50 {
                tb.consume_many(&u, &chunk).expect("fixture");
            }
            u
        };
        let secs = t.elapsed().as_secs_f64();
        eprintln!("  1,000,000-event fixture built in {secs:.1} s ({:.0} events/s through consume_many)", 1e6 / secs);
        let size = std::fs::metadata(&big).map(|m| m.len()).unwrap_or(0);
        run.measurement("fixture.core_1m_build_s", secs, "s", None);
        run.measurement("fixture.core_1m_file_mb", size as f64 / 1e6, "MB", None);

        // open + first decision, fresh instance each time (page cache warm after the first).
        let mut h_open = hist();
        let mut last = None;
        for _ in 0..15 {
            drop(last.take());
            let t = Instant::now();
            let tb = Tally::open(&big, config(Durability::Normal)).expect("reopen");
            let d = tb.check(&big_user, "chat", 1).expect("first decision");
            let _ = h_open.record(t.elapsed().as_nanos().max(1) as u64);
            assert!(d.allowed);
            last = Some(tb);
        }
        let open_ms = h_open.value_at_quantile(0.5) as f64 / 1e6;
        run.result("core.open_ms", open_ms, "ms", None, "≤ 50 ms", Some(open_ms <= 50.0), Some(&h_open));

        let tb = last.expect("instance");
        let small = Tally::open(&path, config(Durability::Normal)).expect("reopen small");
        let (h_big, h_small) = interleaved(
            5,
            40_000,
            || {
                black_box(tb.check(&big_user, "chat", 1).expect("check 1m"));
            },
            || {
                black_box(small.check(&user, "chat", 1).expect("check"));
            },
        );
        let (b50, s50) = (h_big.value_at_quantile(0.5) as f64 / 1000.0, h_small.value_at_quantile(0.5) as f64 / 1000.0);
        run.result(
            "core.check_1m_ledger_p50",
            b50,
            "µs",
            Some(("core.check_p50", s50)),
            "ratio ≤ 1.2",
            Some(b50 / s50 <= 1.2),
            Some(&h_big),
        );
        if use_criterion {
            let mut g = crit.benchmark_group("core.check_1m_ledger");
            g.bench_function("tally_check_1m", |b| b.iter(|| tb.check(&big_user, "chat", 1).expect("check")));
            g.finish();
        }
    }

    crit.final_summary();
    let mut f = std::fs::File::create(&out_path).expect("create output");
    for l in &run.lines {
        writeln!(f, "{l}").expect("write output");
    }
    let _ = run.quick;
    eprintln!("core results written to {out_path}");
}
