//! The usage chart of a user's page: per feature, the daily usage of the last 30 or 90 days (in
//! the user's timezone), the running total in the rule's window (reset where a window starts)
//! and the limit it is held against. The sums come from [`crate::usage::grouped`]; the windows
//! from [`tally_core::period::window`].

use crate::usage::UsageRow;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use tally_core::Rule;
use tally_core::period::{local_midnight, window};

/// The spans a chart may cover, in days.
pub const SPANS: [u32; 2] = [30, 90];

/// One feature's series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeatureSeries {
    /// Feature key.
    pub feature: String,
    /// What is counted: `units`, or `micros` (a budget's AI cost).
    pub unit: &'static str,
    /// The rule's period (`None`: the rule counts in no window, or the plan has no rule).
    pub period: Option<&'static str>,
    /// The limit of one window (`None`: unlimited or no limited rule).
    pub limit: Option<u64>,
    /// Usage of each day.
    pub daily: Vec<i64>,
    /// Usage in the rule's window up to the end of each day.
    pub used: Vec<i64>,
}

/// The whole chart: the days and one series per feature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chart {
    /// The local dates, oldest first (`YYYY-MM-DD`).
    pub days: Vec<String>,
    /// The series, by feature key.
    pub features: Vec<FeatureSeries>,
}

/// The first instant of the chart of `days` days ending today (in `tz`) at `now`.
pub fn start(days: u32, tz: chrono_tz::Tz, now: DateTime<Utc>) -> DateTime<Utc> {
    let today = now.with_timezone(&tz).date_naive();
    local_midnight(today - Duration::days(i64::from(days.max(1)) - 1), tz)
}

/// Builds the chart of `days` days ending today (in the zone in force at `now`) from usage
/// `rows` grouped by (day, feature), against the user's `rules`; running totals restart where a
/// window of the user's `zones` and billing `anchor` starts.
pub fn build(
    rows: &[UsageRow],
    rules: &BTreeMap<String, Rule>,
    zones: &tally_core::TimezoneHistory,
    anchor: DateTime<Utc>,
    now: DateTime<Utc>,
    days: u32,
) -> Chart {
    let tz = zones.zone_at(now);
    let today = now.with_timezone(&tz).date_naive();
    let dates: Vec<NaiveDate> = (0..i64::from(days.max(1))).rev().map(|back| today - Duration::days(back)).collect();
    let index: BTreeMap<String, usize> = dates.iter().enumerate().map(|(i, d)| (d.format("%Y-%m-%d").to_string(), i)).collect();
    let charted = |r: &Rule| matches!(r, Rule::Metered { .. } | Rule::Budget { .. } | Rule::Credits { .. });
    let mut features: BTreeSet<String> = rules.iter().filter(|(_, r)| charted(r)).map(|(k, _)| k.clone()).collect();
    features.extend(rows.iter().filter_map(|r| r.keys.get(1).cloned()));
    let series = features
        .into_iter()
        .map(|feature| {
            let rule = rules.get(&feature);
            let budget = matches!(rule, Some(Rule::Budget { .. }));
            let mut daily = vec![0i64; dates.len()];
            for r in rows.iter().filter(|r| r.keys.get(1) == Some(&feature)) {
                if let Some(&i) = r.keys.first().and_then(|d| index.get(d)) {
                    daily[i] = daily[i].saturating_add(if budget { r.cost_micros } else { r.amount });
                }
            }
            let period = rule.and_then(Rule::period);
            let limit = match rule {
                Some(Rule::Metered { limit, .. }) => *limit,
                Some(Rule::Budget { limit_micros, .. }) => Some(*limit_micros),
                _ => None,
            };
            let used = match period {
                Some(p) => {
                    let mut run = 0i64;
                    let mut current = None;
                    dates
                        .iter()
                        .zip(&daily)
                        .map(|(d, n)| {
                            // The window of the day's noon: noon exists on every local date.
                            let noon = local_midnight(*d, tz) + Duration::hours(12);
                            let w = window(p, noon, zones, anchor).start;
                            if current != Some(w) {
                                current = Some(w);
                                run = 0;
                            }
                            run = run.saturating_add(*n);
                            run
                        })
                        .collect()
                }
                None => daily.clone(),
            };
            FeatureSeries { feature, unit: if budget { "micros" } else { "units" }, period: period.map(|p| p.as_str()), limit, daily, used }
        })
        .collect();
    Chart { days: index.into_keys().collect(), features: series }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn row(day: &str, feature: &str, amount: i64, cost: i64) -> UsageRow {
        UsageRow {
            keys: vec![day.into(), feature.into()],
            events: 1,
            amount,
            input_tokens: 0,
            output_tokens: 0,
            cost_micros: cost,
            credits: 0,
        }
    }

    #[test]
    fn daily_usage_runs_up_in_its_window_and_resets_where_a_window_starts() {
        let catalog = tally_core::Catalog::from_json(
            r#"{"plans":[{"id":"free","features":{
              "chat":{"type":"metered","limit":5,"period":"month","enforcement":"hard"},
              "spend":{"type":"budget","limit_micros":900,"period":"day","enforcement":"hard"},
              "flag":{"type":"flag","enabled":true}}}]}"#,
        )
        .unwrap();
        let rules = catalog.plan("free").unwrap().features.clone();
        let now = Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap();
        let rows = vec![
            row("2026-02-27", "chat", 2, 0),
            row("2026-02-28", "chat", 1, 0),
            row("2026-03-01", "chat", 4, 0),
            row("2026-03-02", "spend", 3, 700),
            row("2026-03-02", "legacy", 6, 0),
            row("2026-01-01", "chat", 9, 0),
        ];
        let c = build(&rows, &rules, &tally_core::TimezoneHistory::fixed(chrono_tz::UTC), now, now, 5);
        assert_eq!(c.days, ["2026-02-26", "2026-02-27", "2026-02-28", "2026-03-01", "2026-03-02"]);
        let by = |f: &str| c.features.iter().find(|s| s.feature == f).unwrap().clone();
        let chat = by("chat");
        assert_eq!(chat.daily, [0, 2, 1, 4, 0], "a day outside the span is left out");
        assert_eq!(chat.used, [0, 2, 3, 4, 4], "March starts a new window");
        assert_eq!((chat.limit, chat.period, chat.unit), (Some(5), Some("month"), "units"));
        let spend = by("spend");
        assert_eq!((spend.daily.clone(), spend.limit, spend.unit), (vec![0, 0, 0, 0, 700], Some(900), "micros"));
        let legacy = by("legacy");
        assert_eq!((legacy.used.clone(), legacy.limit, legacy.period), (vec![0, 0, 0, 0, 6], None, None));
        assert!(c.features.iter().all(|s| s.feature != "flag"), "flags are not charted");
    }

    #[test]
    fn days_follow_the_users_timezone() {
        let tokyo: chrono_tz::Tz = "Asia/Tokyo".parse().unwrap();
        let now = Utc.with_ymd_and_hms(2026, 3, 1, 20, 0, 0).unwrap(); // 05:00 on 2 March in Tokyo
        let c = build(&[], &BTreeMap::new(), &tally_core::TimezoneHistory::fixed(tokyo), now, now, 30);
        assert_eq!(c.days.len(), 30);
        assert_eq!(c.days.last().map(String::as_str), Some("2026-03-02"));
        assert_eq!(start(30, tokyo, now), Utc.with_ymd_and_hms(2026, 1, 31, 15, 0, 0).unwrap());
    }
}
