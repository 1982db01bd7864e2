#!/usr/bin/env python3
"""Writes core/tests/data/period_changes.json: reference calendar windows of users whose
timezone changes, computed with Python's zoneinfo, independently of the Rust code.

The rule: a calendar window (day; ISO week from Monday; month; year) starts at local midnight
of its first day in the zone in force (a midnight in a DST gap: the end of the gap; an
ambiguous one: its earliest occurrence). When a change takes effect, the window in force then
keeps its bounds; the next window runs from that window's end to the new zone's first window
boundary whose local time is at least one period after the local time (in the new zone) of that
end (a month or a year later clamps the day to the month's end); later windows follow the new
zone. A change asked for at `requested_at` while a device lease runs until `lease_until` takes
effect at the later of the two.

This script walks the windows forward one by one (it does not mirror the Rust code's
structure). Run it from the repository root: `python3 scripts/gen-period-vectors.py`. The
output depends only on its inputs and the system's tz database (2026 rules).
"""

import calendar
import json
import sys
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

UTC = timezone.utc
PERIODS = ("day", "week", "month", "year")
OUT = "core/tests/data/period_changes.json"


def iso(t):
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(s):
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def wall(t, zone):
    """The local wall time of instant `t` in `zone`, without zone."""
    return t.astimezone(zone).replace(tzinfo=None, fold=0)


def local_midnight(d, zone):
    """The first instant whose wall time in `zone` is at or after midnight of `d`."""
    naive = datetime.combine(d, time(0, 0))
    candidates = []
    for fold in (0, 1):
        u = naive.replace(tzinfo=zone, fold=fold).astimezone(UTC)
        if wall(u, zone) == naive:
            candidates.append(u)
    if candidates:
        return min(candidates)
    # In a gap: search the instants around it, second by second in halves.
    lo = naive.replace(tzinfo=UTC) - timedelta(hours=30)
    hi = naive.replace(tzinfo=UTC) + timedelta(hours=30)
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        mid = mid.replace(microsecond=0)
        if wall(mid, zone) >= naive:
            hi = mid
        else:
            lo = mid
    return hi


def first_day(period, d):
    if period == "day":
        return d
    if period == "week":
        return d - timedelta(days=d.weekday())
    if period == "month":
        return d.replace(day=1)
    return d.replace(month=1, day=1)


def next_first_day(period, f):
    if period == "day":
        return f + timedelta(days=1)
    if period == "week":
        return f + timedelta(days=7)
    if period == "month":
        return date(f.year + f.month // 12, f.month % 12 + 1, 1)
    return date(f.year + 1, 1, 1)


def plain_window(period, t, zone):
    """The window of `zone` alone containing instant `t`."""
    f = first_day(period, wall(t, zone).date())
    # The local date can disagree with the boundaries near an overlap: look at the neighbours.
    prev = first_day(period, f - timedelta(days=1))
    for first in (prev, f, next_first_day(period, f)):
        start = local_midnight(first, zone)
        end = local_midnight(next_first_day(period, first), zone)
        if start <= t < end:
            return start, end
    raise AssertionError(f"no {period} window for {t} in {zone}")


def add_months(n, months):
    y, m = divmod(n.month - 1 + months, 12)
    y, m = n.year + y, m + 1
    return n.replace(year=y, month=m, day=min(n.day, calendar.monthrange(y, m)[1]))


def one_period_later(period, n):
    if period == "day":
        return n + timedelta(days=1)
    if period == "week":
        return n + timedelta(days=7)
    return add_months(n, 1 if period == "month" else 12)


def transition_end(period, start, zone):
    """The new zone's first boundary at least one period (on its calendar) after `start`."""
    target = one_period_later(period, wall(start, zone))
    d = first_day(period, target.date())
    while datetime.combine(d, time(0, 0)) < target:
        d = next_first_day(period, d)
    return local_midnight(d, zone)


def window(history, period, at):
    """Walks the windows of `history` ([(zone name, from)]) forward until one contains `at`."""
    zone = ZoneInfo(history[0][0])
    changes = [(ZoneInfo(z), f) for z, f in history[1:]]
    begin = min([at] + [f for _, f in changes])
    start, end = plain_window(period, begin, zone)
    while True:
        if start <= at < end:
            return start, end
        taking = [c for c in changes if c[1] < end]
        changes = [c for c in changes if c[1] >= end]
        if taking:
            zone = taking[-1][0]
            start, end = end, transition_end(period, end, zone)
        else:
            start, end = end, plain_window(period, end, zone)[1]


def case(name, period, history, ats, **extra):
    hist = [(z, parse(f)) for z, f in history]
    out = []
    for a in ats:
        t = parse(a)
        s, e = window(hist, period, t)
        out.append(dict(name=name, period=period, history=[{"tz": z, "from": f} for z, f in history], at=a, start=iso(s), end=iso(e), **extra))
    return out


def scan(name, period, history, first, last, step_hours):
    """Cases every `step_hours` from `first` to `last`."""
    t, ats = parse(first), []
    while t <= parse(last):
        ats.append(iso(t))
        t += timedelta(hours=step_hours)
    return case(name, period, history, ats)


def main():
    cases = []
    # The exploit: a day spent in New York, then a move east to where midnight just passed.
    cases += scan("east: New York to Kiritimati", "day",
                  [("America/New_York", "2026-01-01T00:00:00Z"), ("Pacific/Kiritimati", "2026-06-10T10:18:00Z")],
                  "2026-06-09T00:00:00Z", "2026-06-14T00:00:00Z", 3)
    # West: Tokyo to Los Angeles (the old day ends long before Los Angeles' midnight).
    cases += scan("west: Tokyo to Los Angeles", "day",
                  [("Asia/Tokyo", "2026-01-01T00:00:00Z"), ("America/Los_Angeles", "2026-03-02T01:00:00Z")],
                  "2026-03-01T00:00:00Z", "2026-03-06T00:00:00Z", 3)
    # Changes next to DST: into New York the day before its spring gap (23-hour day), into
    # Havana, whose clocks jump at midnight (a gap at the start of a day) and fall back at 01:00
    # (an ambiguous midnight), and into Santiago around its midnight change.
    cases += scan("into New York before its spring gap", "day",
                  [("Europe/Paris", "2026-01-01T00:00:00Z"), ("America/New_York", "2026-03-07T12:00:00Z")],
                  "2026-03-07T00:00:00Z", "2026-03-11T00:00:00Z", 2)
    cases += scan("into Havana before its midnight gap", "day",
                  [("UTC", "2026-01-01T00:00:00Z"), ("America/Havana", "2026-03-06T23:30:00Z")],
                  "2026-03-06T00:00:00Z", "2026-03-10T12:00:00Z", 2)
    cases += scan("out of Havana on its ambiguous midnight", "day",
                  [("America/Havana", "2026-01-01T00:00:00Z"), ("Asia/Kolkata", "2026-11-01T04:30:00Z")],
                  "2026-10-31T00:00:00Z", "2026-11-04T00:00:00Z", 2)
    cases += scan("into Santiago around its autumn change", "day",
                  [("America/Sao_Paulo", "2026-01-01T00:00:00Z"), ("America/Santiago", "2026-04-04T12:00:00Z")],
                  "2026-04-03T00:00:00Z", "2026-04-08T00:00:00Z", 2)
    cases += scan("week: London to Tokyo mid-week", "week",
                  [("Europe/London", "2026-01-01T00:00:00Z"), ("Asia/Tokyo", "2026-03-25T12:00:00Z")],
                  "2026-03-20T00:00:00Z", "2026-04-15T00:00:00Z", 12)
    cases += scan("week: Auckland to Honolulu (west) across New Zealand's autumn change", "week",
                  [("Pacific/Auckland", "2026-01-01T00:00:00Z"), ("Pacific/Honolulu", "2026-04-01T00:00:00Z")],
                  "2026-03-28T00:00:00Z", "2026-04-20T00:00:00Z", 12)
    cases += scan("month: Sydney to New York at a month's end (one month later clamps to Feb 28)", "month",
                  [("Australia/Sydney", "2026-01-01T00:00:00Z"), ("America/New_York", "2026-01-20T00:00:00Z")],
                  "2026-01-10T00:00:00Z", "2026-04-10T00:00:00Z", 48)
    cases += scan("month: two changes in one window, the later wins", "month",
                  [("UTC", "2026-01-01T00:00:00Z"), ("Asia/Tokyo", "2026-05-03T00:00:00Z"), ("America/Chicago", "2026-05-20T00:00:00Z")],
                  "2026-04-25T00:00:00Z", "2026-08-05T00:00:00Z", 48)
    cases += scan("month: a change, then another after the new zone's first window", "month",
                  [("Europe/Berlin", "2026-01-01T00:00:00Z"), ("Asia/Dubai", "2026-02-10T00:00:00Z"), ("America/Denver", "2026-05-15T00:00:00Z")],
                  "2026-02-01T00:00:00Z", "2026-08-05T00:00:00Z", 72)
    cases += case("year: Honolulu to Kiritimati", "year",
                  [("Pacific/Honolulu", "2025-01-01T00:00:00Z"), ("Pacific/Kiritimati", "2026-12-31T12:00:00Z")],
                  ["2026-06-01T00:00:00Z", "2026-12-31T11:00:00Z", "2027-01-01T09:59:59Z", "2027-01-01T10:00:00Z",
                   "2027-06-01T00:00:00Z", "2027-12-31T09:59:59Z", "2027-12-31T10:00:00Z", "2028-12-30T10:00:00Z",
                   "2028-12-31T10:00:00Z"])
    cases += case("year: Tokyo to New York on the first of the year", "year",
                  [("Asia/Tokyo", "2025-01-01T00:00:00Z"), ("America/New_York", "2026-01-01T03:00:00Z")],
                  ["2025-12-31T14:59:59Z", "2025-12-31T15:00:00Z", "2026-07-01T00:00:00Z", "2026-12-31T15:00:00Z",
                   "2027-01-01T05:00:00Z", "2027-06-01T00:00:00Z", "2028-01-01T04:59:59Z", "2028-01-01T05:00:00Z"])
    cases += scan("a change exactly at a window boundary", "day",
                  [("UTC", "2026-01-01T00:00:00Z"), ("Asia/Kathmandu", "2026-07-01T00:00:00Z")],
                  "2026-06-30T12:00:00Z", "2026-07-04T00:00:00Z", 3)
    # A change asked for while a device's lease runs takes effect at the lease's end.
    for requested, lease_until in [("2026-09-14T20:00:00Z", "2026-09-18T06:30:00Z"), ("2026-09-14T20:00:00Z", "2026-09-14T08:00:00Z")]:
        effective = max(parse(requested), parse(lease_until))
        cases += [dict(c, requested_at=requested, lease_until=lease_until) for c in scan(
            f"pending until the lease ends (asked {requested}, lease until {lease_until})", "day",
            [("Europe/Madrid", "2026-01-01T00:00:00Z"), ("Pacific/Chatham", iso(effective))],
            "2026-09-14T00:00:00Z", "2026-09-21T00:00:00Z", 4)]
    doc = {
        "rule": __doc__.strip(),
        "tzdata": "system zoneinfo; rules of 2026",
        "cases": cases,
    }
    # One case a line: small, and a diff names the cases that changed.
    with open(OUT, "w") as f:
        f.write('{"rule": %s,\n "tzdata": %s,\n "cases": [\n' % (json.dumps(doc["rule"]), json.dumps(doc["tzdata"])))
        f.write(",\n".join("  " + json.dumps(c, separators=(",", ":")) for c in cases))
        f.write("\n ]}\n")
    print(f"{OUT}: {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
