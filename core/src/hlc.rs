//! Hybrid logical clocks for last-writer-wins settings.
//!
//! Wire form: `<wall_ms, 15 digits>-<counter, 5 digits>-<node>`, compared as strings.

use std::fmt;

/// A hybrid logical clock timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hlc {
    /// Wall-clock milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Logical counter for events in the same millisecond.
    pub counter: u32,
    /// The writer (device id, or `server`).
    pub node: String,
}

/// Largest wall time representable in 15 digits.
const MAX_WALL: u64 = 999_999_999_999_999;
/// Largest counter representable in 5 digits.
const MAX_COUNTER: u32 = 99_999;

impl Hlc {
    /// Parses the wire form; `None` when malformed.
    pub fn parse(s: &str) -> Option<Hlc> {
        let mut parts = s.splitn(3, '-');
        let (w, c, n) = (parts.next()?, parts.next()?, parts.next()?);
        if w.len() != 15 || c.len() != 5 || n.is_empty() || n.len() > 128 {
            return None;
        }
        if !w.bytes().all(|b| b.is_ascii_digit()) || !c.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Hlc { wall_ms: w.parse().ok()?, counter: c.parse().ok()?, node: n.to_string() })
    }

    /// The next timestamp for a local write by `node` at wall time `now_ms`, after `last`.
    pub fn tick(last: Option<&Hlc>, now_ms: u64, node: &str) -> Hlc {
        let now_ms = now_ms.min(MAX_WALL);
        match last {
            Some(l) if l.wall_ms >= now_ms => {
                if l.counter >= MAX_COUNTER {
                    Hlc { wall_ms: (l.wall_ms + 1).min(MAX_WALL), counter: 0, node: node.into() }
                } else {
                    Hlc { wall_ms: l.wall_ms, counter: l.counter + 1, node: node.into() }
                }
            }
            _ => Hlc { wall_ms: now_ms, counter: 0, node: node.into() },
        }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:015}-{:05}-{}", self.wall_ms, self.counter, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_string_order() {
        let a = Hlc { wall_ms: 1_700_000_000_000, counter: 3, node: "dev-a".into() };
        let s = a.to_string();
        assert_eq!(s, "001700000000000-00003-dev-a");
        assert_eq!(Hlc::parse(&s), Some(a.clone()));
        let b = Hlc::tick(Some(&a), 1_600_000_000_000, "dev-b");
        assert!(b.to_string() > s, "a clock behind never goes backwards");
        assert!(Hlc::parse("17-1-x").is_none());
        assert!(Hlc::parse("001700000000000-00003-").is_none());
        assert!(Hlc::parse("00170000000000a-00003-x").is_none());
    }
}
