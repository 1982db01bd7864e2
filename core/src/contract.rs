//! The contract between device and server: every limit and format that both sides check, written
//! once. The core validates with these functions before it stores anything; the server validates
//! what it receives with the same functions. Whatever one side accepts, the other accepts.
//!
//! A failed check is a [`Violation`]: the field, a machine-readable code (the server's error or
//! rejection code) and a message naming the field.

use crate::wire::{ProfilePatch, WireEvent};
use chrono::{DateTime, Duration, Utc};
use serde_json::Value;
use std::fmt;

/// Longest feature key, in bytes.
pub const MAX_FEATURE_BYTES: usize = 128;
/// Largest amount of one use.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000;
/// Largest input or output token count of one use.
pub const MAX_TOKENS: u64 = 1_000_000_000_000;
/// Largest `metadata`, serialized as JSON, in bytes.
pub const MAX_METADATA_BYTES: usize = 4096;
/// Longest model name, in bytes.
pub const MAX_MODEL_BYTES: usize = 128;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Longest device id, in bytes.
pub const MAX_DEVICE_ID_BYTES: usize = 128;
/// Longest setting key, in bytes.
pub const MAX_SETTING_KEY_BYTES: usize = 128;
/// Largest setting value, serialized as JSON, in bytes.
pub const MAX_SETTING_VALUE_BYTES: usize = 16 * 1024;
/// Most stored (not deleted) setting keys of one user.
pub const MAX_SETTINGS_KEYS: usize = 1000;
/// Most bytes (keys plus serialized values) of one user's stored settings.
pub const MAX_SETTINGS_BYTES: usize = 1024 * 1024;
/// Longest display name, in bytes.
pub const MAX_DISPLAY_NAME_BYTES: usize = 256;
/// Longest avatar URL, in bytes.
pub const MAX_AVATAR_URL_BYTES: usize = 2048;
/// Longest email address, in bytes.
pub const MAX_EMAIL_BYTES: usize = 320;
/// Longest identity-provider subject (`external_id`), in bytes.
pub const MAX_SUBJECT_BYTES: usize = 256;
/// Most store proofs (signed transactions, purchase tokens) in one purchase request; a restore
/// with more sends them in several requests.
pub const MAX_PURCHASES: usize = 100;
/// Shortest password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password, in bytes (a cap, so hashing cannot be made arbitrarily expensive).
pub const MAX_PASSWORD_BYTES: usize = 256;
/// Prefix of the subject (`external_id`) of a password account: `tally|<server user id>`.
/// Identity-provider subjects never start with it.
pub const PASSWORD_SUBJECT_PREFIX: &str = "tally|";
/// Longest secret name, in bytes (names match `[A-Za-z0-9_.-]`).
pub const MAX_SECRET_NAME_BYTES: usize = 128;
/// Largest secret value, in bytes.
pub const MAX_SECRET_VALUE_BYTES: usize = 64 * 1024;
/// Most secrets one user may keep.
pub const MAX_SECRETS_PER_USER: usize = 100;
/// Most items (meters) of one use (`items` on a consume, a hold or the device's consume).
pub const MAX_USE_ITEMS: usize = 16;
/// Largest value a counter, a cost or a credit balance may reach (stored as a signed 64-bit
/// integer on both sides).
pub const MAX_COUNTER: u64 = i64::MAX as u64;
/// How far ahead of the receiver's clock an event's time may count (later times are clamped).
pub const MAX_CLOCK_AHEAD: Duration = Duration::minutes(5);
/// How far ahead of the server's clock a setting's HLC may be before the server re-stamps it.
pub const MAX_HLC_AHEAD_MS: u64 = 5 * 60 * 1000;
/// Earliest and latest accepted `occurred_at` (1970-01-01 to the end of 9999), in seconds.
const TIME_RANGE_SECS: std::ops::Range<i64> = 0..253_402_300_800;

/// Every [`Violation::code`] a check of this module returns.
pub const CODES: &[&str] = &[
    "invalid_amount",
    "invalid_text",
    "metadata_too_large",
    "invalid_event",
    "invalid_id",
    "invalid_setting",
    "value_too_large",
    "quota_exceeded",
    "invalid_profile",
    "invalid_timezone",
    "invalid_email",
    "invalid_password",
    "invalid_secret_name",
    "secret_too_large",
    "too_many_secrets",
    "invalid_items",
];

/// A value that breaks the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The offending field (`amount`, `metadata`, `settings.theme`, …).
    pub field: String,
    /// Machine-readable code: `invalid_amount`, `invalid_text`, `metadata_too_large`,
    /// `invalid_event`, `invalid_setting`, `value_too_large`, `quota_exceeded`, `invalid_profile`.
    pub code: &'static str,
    /// What is wrong, naming the field.
    pub message: String,
}

impl Violation {
    /// A violation of `field` with `code`.
    pub fn new(field: impl Into<String>, code: &'static str, message: impl Into<String>) -> Violation {
        Violation { field: field.into(), code, message: message.into() }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Violation {}

/// Result of a contract check.
pub type Checked<T = ()> = std::result::Result<T, Violation>;

/// Text of at most `max` bytes without U+0000 (which Postgres cannot store). `min` is 0 or 1.
pub fn text(field: &str, value: &str, min: usize, max: usize) -> Checked {
    if value.len() < min || value.len() > max {
        let range = if min == 0 { format!("at most {max} bytes") } else { format!("{min} to {max} bytes") };
        return Err(Violation::new(field, "invalid_text", format!("{field} must be {range}, got {}", value.len())));
    }
    if value.contains('\0') {
        return Err(Violation::new(field, "invalid_text", format!("{field} must not contain U+0000")));
    }
    Ok(())
}

/// Optional text (see [`text`]).
pub fn opt_text(field: &str, value: Option<&str>, max: usize) -> Checked {
    value.map_or(Ok(()), |v| text(field, v, 0, max))
}

/// Whether a JSON value holds U+0000 in any string or object key.
pub fn json_has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(json_has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v)),
        _ => false,
    }
}

/// A JSON value that fits in `max` serialized bytes and holds no U+0000; returns its
/// serialization. `code` is the code of a size violation.
fn json_value(field: &str, v: &Value, max: usize, code: &'static str) -> Checked<String> {
    if json_has_nul(v) {
        return Err(Violation::new(field, "invalid_text", format!("{field} must not contain U+0000")));
    }
    let s = serde_json::to_string(v).map_err(|e| Violation::new(field, "invalid_text", format!("{field}: {e}")))?;
    if s.len() > max {
        return Err(Violation::new(field, code, format!("{field} is {} bytes; the limit is {max}", s.len())));
    }
    Ok(s)
}

/// A feature key: 1 to [`MAX_FEATURE_BYTES`] bytes, no U+0000, not starting with `$`
/// (reserved for pools such as `$credits`).
pub fn feature(key: &str) -> Checked {
    text("feature", key, 1, MAX_FEATURE_BYTES)?;
    if key.starts_with('$') {
        return Err(Violation::new("feature", "invalid_text", "feature keys must not start with '$'"));
    }
    Ok(())
}

/// The features of a use's items: 1 to [`MAX_USE_ITEMS`] of them, each a valid feature key,
/// each at most once (items are decided in order against running totals, so a repeated feature
/// would be ambiguous).
pub fn use_items<'a>(features: impl IntoIterator<Item = &'a str>) -> Checked {
    let mut seen: Vec<&str> = Vec::new();
    for (i, f) in features.into_iter().enumerate() {
        feature(f).map_err(|v| Violation::new(format!("items[{i}].feature"), v.code, v.message))?;
        if seen.contains(&f) {
            return Err(Violation::new(format!("items[{i}].feature"), "invalid_items", format!("feature {f:?} appears more than once in items")));
        }
        seen.push(f);
    }
    if seen.is_empty() || seen.len() > MAX_USE_ITEMS {
        return Err(Violation::new("items", "invalid_items", format!("items must hold 1 to {MAX_USE_ITEMS} entries, got {}", seen.len())));
    }
    Ok(())
}

/// The event id of one item of a use: UUIDv5 with the use's id as namespace and the feature key
/// as name. Device and server derive the same ids, so a retried use never counts twice and a
/// void of the use id finds every item.
pub fn item_event_id(use_id: uuid::Uuid, feature: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(&use_id, feature.as_bytes())
}

/// The amount of one use: 1 to [`MAX_AMOUNT`].
pub fn amount(a: u64) -> Checked {
    if a == 0 || a > MAX_AMOUNT {
        return Err(Violation::new("amount", "invalid_amount", format!("amount must be between 1 and {MAX_AMOUNT}, got {a}")));
    }
    Ok(())
}

/// A token count: at most [`MAX_TOKENS`].
pub fn tokens(field: &str, n: Option<u64>) -> Checked {
    match n {
        Some(n) if n > MAX_TOKENS => Err(Violation::new(field, "invalid_amount", format!("{field} must be at most {MAX_TOKENS}, got {n}"))),
        _ => Ok(()),
    }
}

/// A model name: 1 to [`MAX_MODEL_BYTES`] bytes.
pub fn model(m: Option<&str>) -> Checked {
    m.map_or(Ok(()), |m| text("model", m, 1, MAX_MODEL_BYTES))
}

/// Event metadata: at most [`MAX_METADATA_BYTES`] serialized, no U+0000. `null` is no metadata.
/// Returns the serialization.
pub fn metadata(v: Option<&Value>) -> Checked<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => json_value("metadata", v, MAX_METADATA_BYTES, "metadata_too_large").map(Some),
    }
}

/// An idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_BYTES`] bytes, no U+0000.
pub fn idempotency_key(k: &str) -> Checked {
    text("idempotency_key", k, 1, MAX_IDEMPOTENCY_KEY_BYTES)
}

/// A device id: 1 to [`MAX_DEVICE_ID_BYTES`] bytes, no U+0000.
pub fn device_id(d: &str) -> Checked {
    text("device_id", d, 1, MAX_DEVICE_ID_BYTES)
}

/// The proofs of one purchase request (`field`): 1 to [`MAX_PURCHASES`].
pub fn purchase_count(field: &str, n: usize) -> Checked {
    if n == 0 || n > MAX_PURCHASES {
        return Err(Violation::new(field, "invalid_request", format!("{field} must hold 1 to {MAX_PURCHASES} purchases, got {n}")));
    }
    Ok(())
}

/// An identity-provider subject: 1 to [`MAX_SUBJECT_BYTES`] bytes, no U+0000.
pub fn subject(s: &str) -> Checked {
    text("external_id", s, 1, MAX_SUBJECT_BYTES)
}

/// An event time: between 1970 and the end of year 9999.
pub fn occurred_at(t: DateTime<Utc>) -> Checked {
    if !TIME_RANGE_SECS.contains(&t.timestamp()) {
        return Err(Violation::new("occurred_at", "invalid_event", "occurred_at must be between 1970 and 9999"));
    }
    Ok(())
}

/// The parts of a use that both sides check (feature, amount, AI fields, metadata); returns the
/// serialized metadata.
pub fn usage(
    feature_key: &str,
    amount_units: u64,
    model_name: Option<&str>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    meta: Option<&Value>,
) -> Checked<Option<String>> {
    feature(feature_key)?;
    amount(amount_units)?;
    tokens("input_tokens", input_tokens)?;
    tokens("output_tokens", output_tokens)?;
    model(model_name)?;
    metadata(meta)
}

/// A whole ledger event as sent on the wire.
pub fn event(e: &WireEvent) -> Checked {
    if e.id.is_nil() {
        return Err(Violation::new("id", "invalid_id", "id must not be the nil UUID"));
    }
    usage(&e.feature, e.amount, e.model.as_deref(), e.input_tokens, e.output_tokens, e.metadata.as_ref())?;
    occurred_at(e.occurred_at)?;
    if e.device_seq.is_some_and(|s| s > MAX_COUNTER) {
        return Err(Violation::new("device_seq", "invalid_event", format!("device_seq must be at most {MAX_COUNTER}")));
    }
    Ok(())
}

/// A setting key: 1 to [`MAX_SETTING_KEY_BYTES`] bytes, no U+0000.
pub fn setting_key(key: &str) -> Checked {
    text("setting key", key, 1, MAX_SETTING_KEY_BYTES).map_err(|v| Violation { code: "invalid_setting", ..v })
}

/// A setting value: at most [`MAX_SETTING_VALUE_BYTES`] serialized, no U+0000. Returns the
/// serialization.
pub fn setting_value(key: &str, value: &Value) -> Checked<String> {
    json_value(&format!("settings.{key}"), value, MAX_SETTING_VALUE_BYTES, "value_too_large")
}

/// The stored size of one setting towards [`MAX_SETTINGS_BYTES`].
pub fn setting_bytes(key: &str, serialized_value: &str) -> usize {
    key.len() + serialized_value.len()
}

/// Whether a user whose stored settings would be `keys` keys of `bytes` bytes stays within the
/// per-user caps.
pub fn settings_quota(keys: usize, bytes: usize) -> Checked {
    if keys > MAX_SETTINGS_KEYS {
        return Err(Violation::new("settings", "quota_exceeded", format!("at most {MAX_SETTINGS_KEYS} settings per user")));
    }
    if bytes > MAX_SETTINGS_BYTES {
        return Err(Violation::new("settings", "quota_exceeded", format!("at most {MAX_SETTINGS_BYTES} bytes of settings per user")));
    }
    Ok(())
}

/// An IANA timezone name known to both sides (chrono-tz's database).
pub fn timezone(tz: &str) -> Checked<chrono_tz::Tz> {
    text("timezone", tz, 1, 64)?;
    tz.parse::<chrono_tz::Tz>().map_err(|_| Violation::new("timezone", "invalid_timezone", format!("unknown IANA timezone {tz:?}")))
}

/// A display name: at most [`MAX_DISPLAY_NAME_BYTES`] bytes, no control characters.
pub fn display_name(v: Option<&str>) -> Checked {
    opt_text("display_name", v, MAX_DISPLAY_NAME_BYTES)?;
    no_control("display_name", v)
}

/// An avatar URL: at most [`MAX_AVATAR_URL_BYTES`] bytes, no control characters.
pub fn avatar_url(v: Option<&str>) -> Checked {
    opt_text("avatar_url", v, MAX_AVATAR_URL_BYTES)?;
    no_control("avatar_url", v)
}

/// An email address: at most [`MAX_EMAIL_BYTES`] bytes, no control characters.
pub fn email(v: Option<&str>) -> Checked {
    opt_text("email", v, MAX_EMAIL_BYTES)?;
    no_control("email", v)
}

/// The canonical form of an email address, in which every comparison of emails is made (sign-up,
/// login, reset, pending users, Stripe customers): the local part in NFC with its ASCII letters
/// lowercased (no other case folding), the domain in its UTS-46 non-transitional ASCII form
/// (`Bücher.example` becomes `xn--bcher-kva.example`). Surrounding whitespace is ignored.
///
/// Refused with `invalid_email`: more or less than one `@`, an empty side, whitespace or control
/// characters, more than [`MAX_EMAIL_BYTES`] bytes, a domain UTS-46 refuses, and a local part
/// that compatibility normalization (NFKC) would change beyond canonical composition — the
/// Kelvin sign `\u{212A}`, fullwidth letters, ligatures — since such an address looks like
/// another one.
pub fn canonical_email(v: &str) -> Checked<String> {
    use unicode_normalization::UnicodeNormalization;
    let bad = |why: &str| Violation::new("email", "invalid_email", format!("email must be an address like name@example.com ({why})"));
    let v = v.trim();
    if v.is_empty() || v.len() > MAX_EMAIL_BYTES || v.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad(&format!("1 to {MAX_EMAIL_BYTES} bytes, without spaces or control characters")));
    }
    let Some((local, domain)) = v.rsplit_once('@').filter(|(l, d)| !l.is_empty() && !d.is_empty() && !l.contains('@')) else {
        return Err(bad("one @ with text on both sides"));
    };
    let nfc: String = local.nfc().collect();
    // A character canonical decomposition replaces by a single other one (the Kelvin sign by
    // `K`, the Ohm sign by `Ω`) disappears in NFC as well as in NFKC: refused on its own.
    let singleton = local.chars().any(|c| {
        let mut parts = 0;
        let mut same = false;
        unicode_normalization::char::decompose_canonical(c, |d| {
            parts += 1;
            same = d == c;
        });
        parts == 1 && !same
    });
    if singleton || nfc.nfkc().ne(nfc.chars()) {
        return Err(bad("the part before @ holds a look-alike character such as the Kelvin sign or a fullwidth letter"));
    }
    let domain = idna::uts46::Uts46::new()
        .to_ascii(domain.as_bytes(), idna::uts46::AsciiDenyList::STD3, idna::uts46::Hyphens::CheckFirstLast, idna::uts46::DnsLength::Verify)
        .map_err(|_| bad("the domain is not a valid host name"))?;
    let canonical = format!("{}@{domain}", nfc.to_ascii_lowercase());
    if canonical.len() > MAX_EMAIL_BYTES {
        return Err(bad(&format!("at most {MAX_EMAIL_BYTES} bytes")));
    }
    Ok(canonical)
}

/// A password: [`MIN_PASSWORD_CHARS`] characters to [`MAX_PASSWORD_BYTES`] bytes, no U+0000.
pub fn password(v: &str) -> Checked {
    if v.chars().count() < MIN_PASSWORD_CHARS || v.len() > MAX_PASSWORD_BYTES || v.contains('\0') {
        return Err(Violation::new(
            "password",
            "invalid_password",
            format!("password must be {MIN_PASSWORD_CHARS} characters to {MAX_PASSWORD_BYTES} bytes, without U+0000"),
        ));
    }
    Ok(())
}

/// A secret's name: 1 to [`MAX_SECRET_NAME_BYTES`] of `A-Z a-z 0-9 _ . -`.
pub fn secret_name(v: &str) -> Checked {
    let ok = !v.is_empty() && v.len() <= MAX_SECRET_NAME_BYTES && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Violation::new(
            "name",
            "invalid_secret_name",
            format!("a secret's name must be 1 to {MAX_SECRET_NAME_BYTES} of A-Z, a-z, 0-9, '_', '.', '-'"),
        ))
    }
}

/// A secret's value: at most [`MAX_SECRET_VALUE_BYTES`] bytes, no U+0000. The message names the
/// size, never the value.
pub fn secret_value(v: &str) -> Checked {
    if v.len() > MAX_SECRET_VALUE_BYTES {
        return Err(Violation::new(
            "value",
            "secret_too_large",
            format!("value is {} bytes; the limit is {MAX_SECRET_VALUE_BYTES}", v.len()),
        ));
    }
    if v.contains('\0') {
        return Err(Violation::new("value", "invalid_text", "value must not contain U+0000"));
    }
    Ok(())
}

/// How many secrets a user may hold: storing one more beyond [`MAX_SECRETS_PER_USER`] is refused.
pub fn secrets_count(stored: usize) -> Checked {
    if stored >= MAX_SECRETS_PER_USER {
        return Err(Violation::new("name", "too_many_secrets", format!("a user may keep at most {MAX_SECRETS_PER_USER} secrets")));
    }
    Ok(())
}

fn no_control(field: &str, v: Option<&str>) -> Checked {
    if v.is_some_and(|s| s.chars().any(char::is_control)) {
        return Err(Violation::new(field, "invalid_text", format!("{field} must not contain control characters")));
    }
    Ok(())
}

/// A profile edit (display name, avatar, timezone).
pub fn profile(p: &ProfilePatch) -> Checked {
    display_name(p.display_name.as_deref())?;
    avatar_url(p.avatar_url.as_deref())?;
    if let Some(tz) = &p.timezone {
        timezone(tz)?;
    }
    Ok(())
}

/// `a + b` for a counter, a cost or a balance: an overflow past [`MAX_COUNTER`] is a violation
/// (`invalid_amount`), never a wrap or a saturation.
pub fn checked_sum(field: &str, a: u64, b: u64) -> Checked<u64> {
    a.checked_add(b).filter(|s| *s <= MAX_COUNTER).ok_or_else(|| {
        Violation::new(field, "invalid_amount", format!("{field} would exceed {MAX_COUNTER}; the use is refused and nothing is recorded"))
    })
}

/// `a × b` for a credit cost or a price (see [`checked_sum`]).
pub fn checked_product(field: &str, a: u64, b: u64) -> Checked<u64> {
    a.checked_mul(b).filter(|s| *s <= MAX_COUNTER).ok_or_else(|| {
        Violation::new(field, "invalid_amount", format!("{field} would exceed {MAX_COUNTER}; the use is refused and nothing is recorded"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn limits_are_inclusive_and_nul_is_refused() {
        assert!(feature(&"f".repeat(MAX_FEATURE_BYTES)).is_ok());
        assert!(feature(&"f".repeat(MAX_FEATURE_BYTES + 1)).is_err());
        assert!(feature("").is_err() && feature("a\0b").is_err() && feature("$credits").is_err());
        assert!(amount(MAX_AMOUNT).is_ok() && amount(MAX_AMOUNT + 1).is_err() && amount(0).is_err());
        assert_eq!(amount(0).unwrap_err().code, "invalid_amount");
        let meta = json!({"k": "x".repeat(MAX_METADATA_BYTES - 8)});
        assert_eq!(serde_json::to_string(&meta).unwrap().len(), MAX_METADATA_BYTES);
        assert!(metadata(Some(&meta)).is_ok());
        assert_eq!(metadata(Some(&json!({"k": "x".repeat(MAX_METADATA_BYTES)}))).unwrap_err().code, "metadata_too_large");
        assert_eq!(metadata(Some(&json!({"a\0": 1}))).unwrap_err().code, "invalid_text");
        assert_eq!(setting_value("k", &json!(["\0"])).unwrap_err().field, "settings.k");
        assert!(display_name(Some(&"é".repeat(MAX_DISPLAY_NAME_BYTES / 2))).is_ok());
        assert!(display_name(Some(&"é".repeat(MAX_DISPLAY_NAME_BYTES / 2 + 1))).is_err());
        assert!(timezone("Europe/Paris").is_ok() && timezone("Mars/Olympus").is_err());
    }

    #[test]
    fn emails_compare_in_one_canonical_form() {
        let c = |v: &str| canonical_email(v);
        assert_eq!(c("  Kate@Example.COM ").unwrap(), "kate@example.com");
        // NFD and NFC of é are one address; non-ASCII letters keep their case.
        assert_eq!(c("re\u{301}mi@example.com").unwrap(), "r\u{e9}mi@example.com");
        assert_eq!(c("r\u{e9}mi@example.com").unwrap(), "r\u{e9}mi@example.com");
        assert_eq!(c("\u{c9}mile@example.com").unwrap(), "\u{c9}mile@example.com");
        // The domain in its UTS-46 non-transitional ASCII form: Unicode, punycode and case agree.
        assert_eq!(c("a@B\u{fc}cher.example").unwrap(), "a@xn--bcher-kva.example");
        assert_eq!(c("a@xn--bcher-kva.example").unwrap(), "a@xn--bcher-kva.example");
        assert_eq!(c("a@XN--BCHER-KVA.example").unwrap(), "a@xn--bcher-kva.example");
        assert_eq!(c("a@stra\u{df}e.de").unwrap(), "a@xn--strae-oqa.de", "non-transitional: ß stays ß");
        assert_eq!(c("a@\u{ff45}xample.com").unwrap(), "a@example.com", "UTS-46 maps a fullwidth domain");
        // Look-alike local parts are refused, never folded onto the address they imitate.
        for squat in [
            "\u{212a}ate@example.com",
            "\u{ff4b}ate@example.com",
            "\u{fb01}le@example.com",
            "\u{2126}@example.com",
            "x\u{2460}@example.com",
        ] {
            let v = c(squat).unwrap_err();
            assert_eq!((v.field.as_str(), v.code), ("email", "invalid_email"), "{squat:?}");
        }
        for bad in [
            "",
            "   ",
            "kate",
            "@example.com",
            "kate@",
            "a@b@c.com",
            "ka te@example.com",
            "kate@exa mple.com",
            "k\u{7}@x.com",
            "a@-.com",
            "a@ex_ample.com",
            "a@.com",
            "a@x..com",
        ] {
            assert_eq!(c(bad).unwrap_err().code, "invalid_email", "{bad:?}");
        }
        assert_eq!(c(&format!("{}@example.com", "a".repeat(MAX_EMAIL_BYTES))).unwrap_err().code, "invalid_email");
        assert_eq!(c(&format!("a@{}.com", "b".repeat(64))).unwrap_err().code, "invalid_email", "a DNS label is at most 63 bytes");
    }

    #[test]
    fn sums_never_wrap() {
        assert_eq!(checked_sum("used", MAX_COUNTER - 1, 1), Ok(MAX_COUNTER));
        assert!(checked_sum("used", MAX_COUNTER, 1).is_err());
        assert!(checked_sum("used", u64::MAX, 1).is_err());
        assert!(checked_product("cost", MAX_COUNTER, 2).is_err());
        assert!(settings_quota(MAX_SETTINGS_KEYS, MAX_SETTINGS_BYTES).is_ok());
        assert!(settings_quota(MAX_SETTINGS_KEYS + 1, 0).is_err());
    }

    #[test]
    fn use_items_need_one_to_max_distinct_features_and_item_ids_are_stable() {
        assert!(use_items(["calls", "spend"]).is_ok());
        assert_eq!(use_items(Vec::<&str>::new()).unwrap_err().code, "invalid_items");
        let dup = use_items(["calls", "spend", "calls"]).unwrap_err();
        assert_eq!((dup.code, dup.field.as_str()), ("invalid_items", "items[2].feature"));
        assert_eq!(use_items(["ok", "$credits"]).unwrap_err().field, "items[1].feature");
        let many: Vec<String> = (0..=MAX_USE_ITEMS).map(|i| format!("f{i}")).collect();
        assert!(use_items(many.iter().map(String::as_str)).is_err());
        assert!(use_items(many[..MAX_USE_ITEMS].iter().map(String::as_str)).is_ok());
        let use_id = uuid::Uuid::parse_str("0190a5a0-0000-7000-8000-000000000001").unwrap();
        // Pinned: device and server (and other clients) must derive exactly these ids.
        assert_eq!(item_event_id(use_id, "calls"), uuid::Uuid::new_v5(&use_id, b"calls"));
        assert_ne!(item_event_id(use_id, "calls"), item_event_id(use_id, "spend"));
        assert_eq!(item_event_id(use_id, "calls").get_version_num(), 5);
    }
}
