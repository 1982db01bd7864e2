//! Period windows: which `[start, end)` interval an instant falls in, for each period kind.
//!
//! Calendar periods (`day`, ISO `week`, `month`, `year`) follow the user's IANA timezone, through
//! its history (the timezone history: a change never resets a window in force);
//! `minute`/`hour` align to the Unix epoch; `billing` counts whole months from an anchor (the
//! subscription's period start, or the user's creation time); `lifetime` is a single window.

use chrono::{DateTime, Datelike, Duration, LocalResult, Months, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How often a limit resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// 60 s windows aligned to the Unix epoch.
    Minute,
    /// 3600 s windows aligned to the Unix epoch.
    Hour,
    /// From local midnight to the next.
    Day,
    /// ISO week, from Monday local midnight.
    Week,
    /// From the first of the month, local midnight.
    Month,
    /// From January 1st, local midnight.
    Year,
    /// Monthly from the billing anchor.
    Billing,
    /// One window, never resets.
    Lifetime,
}

impl Period {
    /// All periods, in order.
    pub const ALL: [Period; 8] =
        [Period::Minute, Period::Hour, Period::Day, Period::Week, Period::Month, Period::Year, Period::Billing, Period::Lifetime];

    /// The wire name (`"day"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Year => "year",
            Period::Billing => "billing",
            Period::Lifetime => "lifetime",
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Period {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Period::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown period {s:?} (expected one of minute, hour, day, week, month, year, billing, lifetime)"))
    }
}

/// A half-open interval `[start, end)` of UTC instants. `end` is `None` for `lifetime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Window {
    /// First instant of the window.
    pub start: DateTime<Utc>,
    /// First instant after the window (`resets_at`); `None` when it never resets.
    pub end: Option<DateTime<Utc>>,
}

impl Window {
    /// Whether `at` lies in the window.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        at >= self.start && self.end.is_none_or(|e| at < e)
    }
}

/// The start of the lifetime window (the Unix epoch).
pub fn lifetime_start() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH
}

/// Where a user's calendar windows (`day`, `week`, `month`, `year`) come from: one zone, or the
/// user's timezone history (whose changes never reset a window in force).
pub trait CalendarZones {
    /// The calendar window of `period` (a calendar period) that contains `at`.
    fn calendar_window(&self, period: Period, at: DateTime<Utc>) -> Window;
}

/// A single zone that never changed.
impl CalendarZones for Tz {
    fn calendar_window(&self, period: Period, at: DateTime<Utc>) -> Window {
        calendar_window(period, at, *self)
    }
}

/// The window of `period` that contains `at`, for a user with timezone history `zones` whose
/// billing anchor is `billing_anchor`. Every window of a limit, a total or a lease is this one.
pub fn window(period: Period, at: DateTime<Utc>, zones: &impl CalendarZones, billing_anchor: DateTime<Utc>) -> Window {
    match period {
        Period::Minute => epoch_aligned(at, 60),
        Period::Hour => epoch_aligned(at, 3600),
        Period::Day | Period::Week | Period::Month | Period::Year => zones.calendar_window(period, at),
        Period::Billing => billing_window(at, billing_anchor),
        Period::Lifetime => Window { start: lifetime_start(), end: None },
    }
}

fn epoch_aligned(at: DateTime<Utc>, secs: i64) -> Window {
    let s = at.timestamp().div_euclid(secs) * secs;
    let start = DateTime::from_timestamp(s, 0).unwrap_or(at);
    Window { start, end: Some(start + Duration::seconds(secs)) }
}

/// First day of the calendar window containing local date `d`.
pub(crate) fn first_day(period: Period, d: NaiveDate) -> NaiveDate {
    match period {
        Period::Day => d,
        Period::Week => d - Duration::days(i64::from(d.weekday().num_days_from_monday())),
        Period::Month => d.with_day(1).unwrap_or(d),
        _ => d.with_ordinal(1).unwrap_or(d),
    }
}

/// First day of the next calendar window after the one starting on `first`.
pub(crate) fn next_first_day(period: Period, first: NaiveDate) -> NaiveDate {
    match period {
        Period::Day => first + Duration::days(1),
        Period::Week => first + Duration::days(7),
        Period::Month => first + Months::new(1),
        _ => first + Months::new(12),
    }
}

/// The UTC instant of local midnight at the start of `d` in `tz`: the earliest occurrence when
/// ambiguous, the end of the gap when it does not exist.
pub fn local_midnight(d: NaiveDate, tz: Tz) -> DateTime<Utc> {
    let naive = d.and_hms_opt(0, 0, 0).unwrap_or_default();
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(a, b) => a.min(b).with_timezone(&Utc),
        LocalResult::None => {
            // In a gap: find the first UTC instant whose local time is at or after midnight.
            let guess = naive.and_utc().timestamp();
            let (mut lo, mut hi) = (guess - 30 * 3600, guess + 30 * 3600);
            let local = |s: i64| DateTime::from_timestamp(s, 0).map(|t| t.with_timezone(&tz).naive_local());
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if local(mid).is_some_and(|l| l >= naive) { hi = mid } else { lo = mid }
            }
            DateTime::from_timestamp(hi, 0).unwrap_or_else(|| naive.and_utc())
        }
    }
}

/// The calendar window of `period` containing `at` in the single zone `tz` (no history).
pub(crate) fn calendar_window(period: Period, at: DateTime<Utc>, tz: Tz) -> Window {
    let mut first = first_day(period, at.with_timezone(&tz).date_naive());
    // Around DST overlaps the local date can disagree with the window boundaries; step to the
    // window that really contains `at`.
    for _ in 0..3 {
        let start = local_midnight(first, tz);
        let next = next_first_day(period, first);
        let end = local_midnight(next, tz);
        if at < start {
            first = first_day(period, first - Duration::days(1));
        } else if at >= end {
            first = next;
        } else {
            return Window { start, end: Some(end) };
        }
    }
    let start = local_midnight(first, tz);
    Window { start, end: Some(local_midnight(next_first_day(period, first), tz)) }
}

fn add_months(anchor: DateTime<Utc>, k: i64) -> DateTime<Utc> {
    let m = Months::new(k.unsigned_abs().min(u64::from(u32::MAX)) as u32);
    let r = if k >= 0 { anchor.checked_add_months(m) } else { anchor.checked_sub_months(m) };
    r.unwrap_or(anchor)
}

/// The billing window containing `at`: whole months counted from `anchor`.
pub fn billing_window(at: DateTime<Utc>, anchor: DateTime<Utc>) -> Window {
    let mut k = i64::from(at.year() - anchor.year()) * 12 + i64::from(at.month()) - i64::from(anchor.month());
    while add_months(anchor, k) > at {
        k -= 1;
    }
    while add_months(anchor, k + 1) <= at {
        k += 1;
    }
    Window { start: add_months(anchor, k), end: Some(add_months(anchor, k + 1)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Every reference case of `core/tests/data/periods.json` (computed independently with Python).
    #[test]
    fn reference_vectors() {
        let v: serde_json::Value = serde_json::from_str(include_str!("../tests/data/periods.json")).unwrap();
        let mut failures = Vec::new();
        let cal = v["calendar"].as_array().unwrap();
        for c in cal {
            let tz: Tz = c["timezone"].as_str().unwrap().parse().unwrap();
            let p: Period = c["period"].as_str().unwrap().parse().unwrap();
            let w = window(p, t(c["at"].as_str().unwrap()), &tz, t("2020-01-01T00:00:00Z"));
            let want = (t(c["start"].as_str().unwrap()), Some(t(c["end"].as_str().unwrap())));
            if (w.start, w.end) != want {
                failures.push(format!("{c}: got {w:?}"));
            }
        }
        let bill = v["billing"].as_array().unwrap();
        for c in bill {
            let w = billing_window(t(c["at"].as_str().unwrap()), t(c["anchor"].as_str().unwrap()));
            let want = (t(c["start"].as_str().unwrap()), Some(t(c["end"].as_str().unwrap())));
            if (w.start, w.end) != want {
                failures.push(format!("{c}: got {w:?}"));
            }
        }
        assert!(cal.len() + bill.len() >= 270);
        assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    }

    #[test]
    fn tokyo_day_ends_at_tokyo_midnight() {
        let w = window(Period::Day, t("2026-03-10T16:00:00Z"), &chrono_tz::Asia::Tokyo, t("2020-01-01T00:00:00Z"));
        assert_eq!(w.start, t("2026-03-10T15:00:00Z"));
        assert_eq!(w.end, Some(t("2026-03-11T15:00:00Z")));
    }

    #[test]
    fn dst_days_are_23_and_25_hours() {
        let ny = chrono_tz::America::New_York;
        let spring = window(Period::Day, t("2026-03-08T12:00:00Z"), &ny, t("2020-01-01T00:00:00Z"));
        assert_eq!(spring.end.unwrap() - spring.start, Duration::hours(23));
        let fall = window(Period::Day, t("2026-11-01T12:00:00Z"), &ny, t("2020-01-01T00:00:00Z"));
        assert_eq!(fall.end.unwrap() - fall.start, Duration::hours(25));
    }

    #[test]
    fn billing_anchor_on_31st_clamps_and_returns() {
        let a = t("2027-01-31T10:00:00Z");
        let feb = billing_window(t("2027-03-01T00:00:00Z"), a);
        assert_eq!(feb.start, t("2027-02-28T10:00:00Z"));
        assert_eq!(feb.end, Some(t("2027-03-31T10:00:00Z")));
        let before = billing_window(t("2026-12-31T09:00:00Z"), a);
        assert_eq!(before.start, t("2026-11-30T10:00:00Z"));
    }

    #[test]
    fn leap_day_and_week_and_lifetime() {
        let w = window(Period::Month, t("2028-02-29T23:59:59Z"), &Tz::UTC, t("2020-01-01T00:00:00Z"));
        assert_eq!(w.end, Some(t("2028-03-01T00:00:00Z")));
        let wk = window(Period::Week, t("2026-11-25T12:00:00Z"), &Tz::UTC, t("2020-01-01T00:00:00Z"));
        assert_eq!(wk.start, t("2026-11-23T00:00:00Z"));
        let l = window(Period::Lifetime, t("2026-11-25T12:00:00Z"), &Tz::UTC, t("2020-01-01T00:00:00Z"));
        assert_eq!(l.end, None);
        assert!(l.contains(t("2100-01-01T00:00:00Z")));
        assert!("fortnight".parse::<Period>().is_err());
    }
}
