//! Property test: random sequences of consume / replay / check / clock moves (forwards and
//! backwards) across three users in three zones and several features. After every step the
//! counters (`usage().used`) equal the ledger sums of the current window, computed here
//! independently from the events table and `tally_core::period::window`; replays return the
//! first decision and change no total; users never see each other's events.

mod common;
use chrono::{DateTime, Duration, Utc};
use common::*;
use proptest::prelude::*;
use std::collections::HashMap;
use tally_core::period::{Period, window};
use tally_core::{Decision, Entitlements, Error, Reason, SubscriptionStatus, UsageMeta, UserUpdate};

/// (feature, period, budget?)
const FEATURES: [(&str, Period, bool); 6] = [
    ("daily", Period::Day, false),
    ("hourly", Period::Hour, false),
    ("ai_chat", Period::Month, false),
    ("notes", Period::Day, false),
    ("weekly", Period::Week, false),
    ("ai_spend", Period::Day, true),
];
const ZONES: [&str; 3] = ["UTC", "America/New_York", "Asia/Kolkata"];

#[derive(Debug, Clone)]
enum Op {
    Consume { user: usize, feature: usize, amount: u64, key: Option<u8>, tokens: Option<u64> },
    Replay { pick: usize },
    Check { user: usize, feature: usize, amount: u64 },
    Advance { secs: i64 },
    Back { secs: i64 },
    SetZone { user: usize, zone: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 0..FEATURES.len(), 1..4u64, proptest::option::of(0..6u8), proptest::option::of(0..300u64))
            .prop_map(|(user, feature, amount, key, tokens)| Op::Consume { user, feature, amount, key, tokens }),
        2 => any::<usize>().prop_map(|pick| Op::Replay { pick }),
        1 => (0..3usize, 0..FEATURES.len(), 1..500u64).prop_map(|(user, feature, amount)| Op::Check { user, feature, amount }),
        2 => prop_oneof![0..120i64, 0..7200i64, 0..(3 * 86_400i64)].prop_map(|secs| Op::Advance { secs }),
        1 => (0..(2 * 86_400i64)).prop_map(|secs| Op::Back { secs }),
        1 => (0..3usize, 0..ZONES.len()).prop_map(|(user, zone)| Op::SetZone { user, zone }),
    ]
}

fn meta(key: Option<u8>, feature: usize, tokens: Option<u64>) -> UsageMeta {
    let mut m = UsageMeta { idempotency_key: key.map(|k| format!("k{k}")), ..UsageMeta::default() };
    if FEATURES[feature].2
        && let Some(t) = tokens
    {
        m.model = Some("gpt-4o".into());
        m.input_tokens = Some(t);
        m.output_tokens = Some(t / 3);
    }
    m
}

/// (feature, amount, input tokens, first decision) of a recorded keyed consume.
type Keyed = (usize, u64, Option<u64>, Decision);
/// (user, feature, amount, key, tokens) of an issued consume.
type Issued = (usize, usize, u64, Option<u8>, Option<u64>);

struct Model {
    users: Vec<(String, chrono_tz::Tz, DateTime<Utc>)>,
    /// (user, key) -> (feature, amount, tokens, first decision) of recorded keyed consumes.
    keyed: HashMap<(usize, u8), Keyed>,
    /// Consumes issued so far (for replays).
    issued: Vec<Issued>,
    events: [i64; 3],
    highest: DateTime<Utc>,
}

fn ledger_sum(e: &Env, user: &str, feature: &str, budget: bool, w: tally_core::Window) -> u64 {
    let c = e.raw();
    let mut st = c.prepare("SELECT occurred_at, amount, COALESCE(cost_micros, 0) FROM events WHERE user_id = ?1 AND feature = ?2").unwrap();
    let rows = st.query_map([user, feature], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))).unwrap();
    rows.map(Result::unwrap)
        .filter(|(at, _, _)| w.contains(DateTime::from_timestamp_millis(*at).unwrap()))
        .map(|(_, amount, cost)| if budget { cost as u64 } else { amount as u64 })
        .sum()
}

fn verify(e: &Env, m: &Model) -> Result<(), TestCaseError> {
    let raw = e.raw();
    for (i, (id, tz, anchor)) in m.users.iter().enumerate() {
        let n = count(&raw, "SELECT COUNT(*) FROM events WHERE user_id = ?1", id);
        prop_assert_eq!(n, m.events[i], "events of user {}", i);
        for (f, p, budget) in FEATURES {
            let u = e.tally.usage(id, f).unwrap();
            let w = window(p, m.highest, &tally_core::TimezoneHistory::fixed(*tz), *anchor);
            prop_assert_eq!(u.period_start, Some(w.start), "{} window of user {}", f, i);
            prop_assert_eq!(u.resets_at, w.end);
            prop_assert_eq!(u.used, ledger_sum(e, id, f, budget, w), "{} of user {} at {}", f, i, m.highest);
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let e = Env::new();
    let start = tally_core::Clock::now(&*e.clock);
    let mut users = Vec::new();
    for (i, zone) in ZONES.iter().enumerate() {
        let u = e.tally.create_local_user(None).unwrap();
        e.tally.update_user(&u.id, UserUpdate { timezone: Some((*zone).into()), ..UserUpdate::default() }).unwrap();
        if i == 2 {
            e.tally
                .set_entitlements(&u.id, Entitlements { plan: "pro".into(), status: SubscriptionStatus::Active, ..Entitlements::free() })
                .unwrap();
        }
        users.push((u.id, zone.parse().unwrap(), u.created_at));
    }
    let mut m = Model { users, keyed: HashMap::new(), issued: Vec::new(), events: [0; 3], highest: start };
    for op in ops {
        let op = match op {
            Op::Replay { pick } if !m.issued.is_empty() => {
                let (user, feature, amount, key, tokens) = m.issued[pick % m.issued.len()];
                Op::Consume { user, feature, amount, key, tokens }
            }
            Op::Replay { .. } => continue,
            other => other,
        };
        match op {
            Op::Consume { user, feature, amount, key, tokens } => {
                m.highest = m.highest.max(tally_core::Clock::now(&*e.clock));
                m.issued.push((user, feature, amount, key, tokens));
                let id = m.users[user].0.clone();
                let meta = meta(key, feature, tokens);
                let prior = key.and_then(|k| m.keyed.get(&(user, k)).cloned());
                let before: Vec<u64> = FEATURES.iter().map(|f| e.tally.usage(&id, f.0).unwrap().used).collect();
                let r = e.tally.consume(&id, FEATURES[feature].0, amount, meta.clone());
                let tokens_used = meta.input_tokens;
                match prior {
                    Some((f, a, t, d)) if (f, a, t) == (feature, amount, tokens_used) => {
                        prop_assert_eq!(r.unwrap(), d, "replay returns the first decision");
                        let after: Vec<u64> = FEATURES.iter().map(|f| e.tally.usage(&id, f.0).unwrap().used).collect();
                        prop_assert_eq!(before, after, "a replay changed totals");
                    }
                    Some(_) => {
                        prop_assert!(matches!(r, Err(Error::IdempotencyConflict(_))), "{:?}", r);
                    }
                    None => {
                        let d = r.unwrap();
                        if d.allowed {
                            m.events[user] += 1;
                            if let Some(k) = key {
                                m.keyed.insert((user, k), (feature, amount, tokens_used, d.clone()));
                            }
                        } else {
                            prop_assert!(matches!(d.reason, Reason::LimitReached), "{:?}", d);
                        }
                    }
                }
            }
            Op::Check { user, feature, amount } => {
                m.highest = m.highest.max(tally_core::Clock::now(&*e.clock));
                e.tally.check(&m.users[user].0, FEATURES[feature].0, amount).unwrap();
            }
            Op::Advance { secs } => e.clock.advance(Duration::seconds(secs)),
            Op::Back { secs } => e.clock.advance(Duration::seconds(-secs)),
            Op::SetZone { user, zone } => {
                m.highest = m.highest.max(tally_core::Clock::now(&*e.clock));
                let upd = UserUpdate { timezone: Some(ZONES[zone].into()), ..UserUpdate::default() };
                e.tally.update_user(&m.users[user].0, upd).unwrap();
                m.users[user].1 = ZONES[zone].parse().unwrap();
            }
            Op::Replay { .. } => unreachable!(),
        }
        // usage() below observes the clock too.
        m.highest = m.highest.max(tally_core::Clock::now(&*e.clock));
        verify(&e, &m)?;
    }
    // A fresh instance on the file (another process) agrees.
    let again = e.reopen();
    for (id, _, _) in &m.users {
        for (f, _, _) in FEATURES {
            prop_assert_eq!(again.usage(id, f).unwrap().used, e.tally.usage(id, f).unwrap().used);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn counters_equal_ledger_sums(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}
