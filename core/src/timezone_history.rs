//! A user's timezone history and the calendar windows it yields.
//!
//! A timezone change never resets a window in force: the `day`, `week`, `month` or `year`
//! window in force when a change takes effect keeps its bounds; the next window runs from that
//! window's end to the new zone's first boundary at least one full period later (one period
//! counted on the new zone's calendar from the old window's end); later windows follow the new
//! zone. So no change ever yields more than one limit per period. The server and the device
//! both compute every calendar window through [`TimezoneHistory::window`].

use crate::period::{Period, Window, calendar_window, first_day, local_midnight, next_first_day};
use chrono::{DateTime, Duration, Months, NaiveDateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};

/// How long a device token's history reaches back: changes that took effect within this span,
/// after the zone in force before them.
pub const TOKEN_HISTORY_SPAN: Duration = Duration::days(400);

/// The shortest time between two timezone changes of a user (`timezone_change_too_soon`).
pub const MIN_CHANGE_INTERVAL: Duration = Duration::hours(24);

/// When a timezone change received at `received` takes effect: at receipt, but not before
/// `latest_lease_until`, the latest `lease_until` of the user's devices (until then their
/// leases' windows stay as their tokens computed them).
pub fn change_effective_at(received: DateTime<Utc>, latest_lease_until: Option<DateTime<Utc>>) -> DateTime<Utc> {
    latest_lease_until.map_or(received, |u| u.max(received))
}

/// One entry of a timezone history on the wire (the `tz_history` claim of entitlement tokens):
/// from `from` on, `tz` is the user's zone. The first entry is the zone in force before the
/// others (its `from` says since when, and changes no window).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ZoneChange {
    /// IANA timezone.
    pub tz: String,
    /// When it takes (or took) effect.
    pub from: DateTime<Utc>,
}

/// A change of zone at an instant, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tz: Tz,
    from: DateTime<Utc>,
}

/// The windows a change yields for one period: before `start` the earlier zones apply; from
/// `start` to `end` one window; from `end` on, `tz`'s calendar.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    tz: Tz,
}

/// A user's zones over time: an initial zone and the changes after it, in the order they take
/// effect. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct TimezoneHistory {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    initial: Tz,
    changes: Vec<Entry>,
    /// Per calendar period (day, week, month, year), the segments of `changes`, computed once.
    segments: [OnceLock<Vec<Segment>>; 4],
}

impl PartialEq for TimezoneHistory {
    fn eq(&self, other: &Self) -> bool {
        self.inner.initial == other.inner.initial && self.inner.changes == other.inner.changes
    }
}

impl Eq for TimezoneHistory {}

impl TimezoneHistory {
    /// One zone for all time.
    pub fn fixed(tz: Tz) -> TimezoneHistory {
        TimezoneHistory::build(tz, Vec::new())
    }

    fn build(initial: Tz, changes: Vec<Entry>) -> TimezoneHistory {
        TimezoneHistory { inner: Arc::new(Inner { initial, changes, segments: Default::default() }) }
    }

    /// `initial`, then each `(zone, effective at)` change in order. Changes must not go back in
    /// time (equal instants: the later one wins).
    pub fn new(initial: Tz, changes: impl IntoIterator<Item = (Tz, DateTime<Utc>)>) -> Result<TimezoneHistory, String> {
        let changes: Vec<Entry> = changes.into_iter().map(|(tz, from)| Entry { tz, from }).collect();
        if let Some(w) = changes.windows(2).find(|w| w[1].from < w[0].from) {
            return Err(format!("timezone history goes back in time at {}", w[1].from.to_rfc3339()));
        }
        Ok(TimezoneHistory::build(initial, changes))
    }

    /// Parses the wire form (`tz_history`): the first entry is the initial zone. `Err` naming
    /// the entry for an unknown zone, an empty list or entries out of order.
    pub fn from_wire(entries: &[ZoneChange]) -> Result<TimezoneHistory, String> {
        let parse = |i: usize, c: &ZoneChange| {
            crate::contract::timezone(&c.tz).map(|tz| (tz, c.from)).map_err(|v| format!("tz_history[{i}]: {}", v.message))
        };
        let mut it = entries.iter().enumerate();
        let (_, first) = it.next().ok_or("tz_history is empty")?;
        let (initial, _) = parse(0, first)?;
        let changes = it.map(|(i, c)| parse(i, c)).collect::<Result<Vec<_>, String>>()?;
        TimezoneHistory::new(initial, changes)
    }

    /// The wire form: the zone in force at `since` (dated `initial_from`, or the first change
    /// when that is earlier, when no change came before it), then every change from `since` on. A device token carries this with
    /// `since` = issuance − [`TOKEN_HISTORY_SPAN`].
    pub fn to_wire(&self, since: DateTime<Utc>, initial_from: DateTime<Utc>) -> Vec<ZoneChange> {
        let i = &self.inner;
        let kept = i.changes.partition_point(|c| c.from < since);
        let first = match kept.checked_sub(1).and_then(|k| i.changes.get(k)) {
            Some(c) => ZoneChange { tz: c.tz.name().into(), from: c.from },
            None => ZoneChange { tz: i.initial.name().into(), from: i.changes.first().map_or(initial_from, |c| c.from.min(initial_from)) },
        };
        std::iter::once(first).chain(i.changes[kept..].iter().map(|c| ZoneChange { tz: c.tz.name().into(), from: c.from })).collect()
    }

    /// The zone in force at `at`.
    pub fn zone_at(&self, at: DateTime<Utc>) -> Tz {
        let i = &self.inner;
        let n = i.changes.partition_point(|c| c.from <= at);
        n.checked_sub(1).and_then(|k| i.changes.get(k)).map_or(i.initial, |c| c.tz)
    }

    /// The latest change taking effect after `now`, if any.
    pub fn pending(&self, now: DateTime<Utc>) -> Option<(Tz, DateTime<Utc>)> {
        self.inner.changes.last().filter(|c| c.from > now).map(|c| (c.tz, c.from))
    }

    /// The first instant after `now` at which the zone in force changes, if any.
    pub fn next_change(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.inner.changes.iter().map(|c| c.from).find(|t| *t > now)
    }

    /// A text naming the whole history (initial zone, then `zone@instant` per change): equal
    /// texts, equal windows. Counters are kept per key and rebuilt when it changes.
    pub fn key(&self) -> String {
        let i = &self.inner;
        let mut k = i.initial.name().to_string();
        for c in &i.changes {
            k.push(';');
            k.push_str(c.tz.name());
            k.push('@');
            k.push_str(&c.from.timestamp_micros().to_string());
        }
        k
    }

    /// Parses a [`TimezoneHistory::key`].
    pub fn from_key(key: &str) -> Result<TimezoneHistory, String> {
        let mut parts = key.split(';');
        let zone = |s: &str| crate::contract::timezone(s).map_err(|v| v.message);
        let initial = zone(parts.next().unwrap_or_default())?;
        let changes = parts
            .map(|p| {
                let (tz, at) = p.split_once('@').ok_or_else(|| format!("bad timezone history entry {p:?}"))?;
                let at = at.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(|| format!("bad instant in {p:?}"))?;
                Ok((zone(tz)?, at))
            })
            .collect::<Result<Vec<_>, String>>()?;
        TimezoneHistory::new(initial, changes)
    }

    /// The calendar window of `period` (`day`, `week`, `month` or `year`) containing `at`;
    /// `None` for the other periods, which no zone affects.
    pub fn window(&self, period: Period, at: DateTime<Utc>) -> Option<Window> {
        let slot = calendar_slot(period)?;
        let i = &self.inner;
        let segments = i.segments[slot].get_or_init(|| {
            let mut segs: Vec<Segment> = Vec::with_capacity(i.changes.len());
            for c in &i.changes {
                let in_force = in_segments(&segs, i.initial, period, c.from);
                let start = in_force.end.unwrap_or(in_force.start);
                segs.push(Segment { start, end: first_boundary_after_one_period(period, start, c.tz), tz: c.tz });
            }
            segs
        });
        Some(in_segments(segments, i.initial, period, at))
    }
}

impl crate::period::CalendarZones for TimezoneHistory {
    fn calendar_window(&self, period: Period, at: DateTime<Utc>) -> Window {
        self.window(period, at).unwrap_or_else(|| calendar_window(period, at, self.zone_at(at)))
    }
}

/// The index of a calendar period in [`Inner::segments`].
fn calendar_slot(period: Period) -> Option<usize> {
    match period {
        Period::Day => Some(0),
        Period::Week => Some(1),
        Period::Month => Some(2),
        Period::Year => Some(3),
        Period::Minute | Period::Hour | Period::Billing | Period::Lifetime => None,
    }
}

/// The window containing `at` under `segments` (latest first), before them `initial`'s.
fn in_segments(segments: &[Segment], initial: Tz, period: Period, at: DateTime<Utc>) -> Window {
    for s in segments.iter().rev() {
        if at >= s.end {
            return calendar_window(period, at, s.tz);
        }
        if at >= s.start {
            return Window { start: s.start, end: Some(s.end) };
        }
    }
    calendar_window(period, at, initial)
}

/// The first boundary of `tz`'s `period` windows whose local time is at least one period after
/// the local time of `start` in `tz`.
fn first_boundary_after_one_period(period: Period, start: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
    let local = start.with_timezone(&tz).naive_local();
    let later = add_one_period(period, local);
    let first = first_day(period, later.date());
    let day = if later == first.and_time(chrono::NaiveTime::MIN) { first } else { next_first_day(period, first) };
    local_midnight(day, tz)
}

/// `t` plus one `period` on the local calendar (a month or a year later clamps the day to the
/// month's end: Jan 31 → Feb 28).
fn add_one_period(period: Period, t: NaiveDateTime) -> NaiveDateTime {
    let months = |m: u32| t.checked_add_months(Months::new(m)).unwrap_or(t);
    match period {
        Period::Week => t + Duration::days(7),
        Period::Month => months(1),
        Period::Year => months(12),
        Period::Day | Period::Minute | Period::Hour | Period::Billing | Period::Lifetime => t + Duration::days(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Every case of `core/tests/data/period_changes.json`, computed independently by
    /// `scripts/gen-period-vectors.py` (Python's zoneinfo).
    #[test]
    fn reference_vectors_with_changes() {
        let v: serde_json::Value = serde_json::from_str(include_str!("../tests/data/period_changes.json")).unwrap();
        let cases = v["cases"].as_array().unwrap();
        let mut failures = Vec::new();
        for c in cases {
            let history: Vec<ZoneChange> = serde_json::from_value(c["history"].clone()).unwrap();
            if let (Some(asked), Some(lease)) = (c["requested_at"].as_str(), c["lease_until"].as_str()) {
                let effective = change_effective_at(t(asked), Some(t(lease)));
                assert_eq!(history[1].from, effective, "{c}");
            }
            let h = TimezoneHistory::from_wire(&history).unwrap();
            let p: Period = c["period"].as_str().unwrap().parse().unwrap();
            let w = crate::period::window(p, t(c["at"].as_str().unwrap()), &h, t("2020-01-01T00:00:00Z"));
            if (w.start, w.end) != (t(c["start"].as_str().unwrap()), Some(t(c["end"].as_str().unwrap()))) {
                failures.push(format!("{c}: got {w:?}"));
            }
        }
        assert!(cases.len() >= 600, "{} cases", cases.len());
        assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    }

    #[test]
    fn a_change_keeps_the_window_in_force_and_the_next_lasts_a_full_period() {
        // The exploit: a day spent in New York, then a move to a zone whose midnight just passed.
        let ny = chrono_tz::America::New_York;
        let h = TimezoneHistory::new(ny, [(chrono_tz::Pacific::Kiritimati, t("2026-06-10T10:18:00Z"))]).unwrap();
        let w = h.window(Period::Day, t("2026-06-10T10:30:00Z")).unwrap();
        assert_eq!((w.start, w.end), (t("2026-06-10T04:00:00Z"), Some(t("2026-06-11T04:00:00Z"))));
        // 2026-06-11T04:00Z is 18:00 on the 11th in Kiritimati (UTC+14); a day later is 18:00
        // on the 12th; the first midnight after it: the 13th, 00:00 = 2026-06-12T10:00Z.
        let next = h.window(Period::Day, t("2026-06-11T05:00:00Z")).unwrap();
        assert_eq!((next.start, next.end), (t("2026-06-11T04:00:00Z"), Some(t("2026-06-12T10:00:00Z"))));
        let later = h.window(Period::Day, t("2026-06-12T12:00:00Z")).unwrap();
        assert_eq!((later.start, later.end), (t("2026-06-12T10:00:00Z"), Some(t("2026-06-13T10:00:00Z"))));
        // Before the change: New York's days.
        let before = h.window(Period::Day, t("2026-06-09T12:00:00Z")).unwrap();
        assert_eq!(before.start, t("2026-06-09T04:00:00Z"));
        assert_eq!(h.window(Period::Hour, t("2026-06-09T12:00:00Z")), None);
    }

    #[test]
    fn wire_and_key_forms_round_trip_and_trim_to_the_span() {
        let h = TimezoneHistory::new(
            chrono_tz::UTC,
            [(chrono_tz::Asia::Tokyo, t("2025-01-01T00:00:00Z")), (chrono_tz::Europe::Paris, t("2026-06-01T12:34:56.789Z"))],
        )
        .unwrap();
        assert_eq!(TimezoneHistory::from_key(&h.key()).unwrap(), h);
        let all = h.to_wire(t("2020-01-01T00:00:00Z"), t("2019-01-01T00:00:00Z"));
        assert_eq!(all.len(), 3);
        assert_eq!(TimezoneHistory::from_wire(&all).unwrap(), h);
        let recent = h.to_wire(t("2026-01-01T00:00:00Z"), t("2019-01-01T00:00:00Z"));
        assert_eq!(
            recent,
            vec![
                ZoneChange { tz: "Asia/Tokyo".into(), from: t("2025-01-01T00:00:00Z") },
                ZoneChange { tz: "Europe/Paris".into(), from: t("2026-06-01T12:34:56.789Z") }
            ]
        );
        assert_eq!(h.zone_at(t("2026-06-01T12:00:00Z")), chrono_tz::Asia::Tokyo);
        assert_eq!(h.pending(t("2026-06-01T12:00:00Z")), Some((chrono_tz::Europe::Paris, t("2026-06-01T12:34:56.789Z"))));
        assert!(TimezoneHistory::from_wire(&[]).is_err());
        assert!(TimezoneHistory::from_wire(&[ZoneChange { tz: "Mars/Olympus".into(), from: t("2020-01-01T00:00:00Z") }]).is_err());
        let backwards = [(chrono_tz::UTC, t("2026-01-02T00:00:00Z")), (chrono_tz::UTC, t("2026-01-01T00:00:00Z"))];
        assert!(TimezoneHistory::new(chrono_tz::UTC, backwards).is_err());
    }
}
