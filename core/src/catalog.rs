//! The plan catalog: model pricing, plans, and the feature rules each plan grants.
//!
//! The JSON format is docs/catalog.md; validation errors name the offending path
//! (`plans[1].features.api.limit`).

use crate::error::{Error, Result};
use crate::lease::Share;
use crate::period::Period;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};

/// Price of one AI model, in micro-units of currency per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPrice {
    /// Price per million input tokens.
    pub input_micros_per_mtok: u64,
    /// Price per million output tokens.
    pub output_micros_per_mtok: u64,
}

impl ModelPrice {
    /// Cost of a call in micros, rounded up; a cost past the contract's counter range is a
    /// violation (`invalid_amount`), never a wrapped or saturated number.
    pub fn cost_micros(&self, input_tokens: u64, output_tokens: u64) -> crate::contract::Checked<u64> {
        let total = u128::from(input_tokens) * u128::from(self.input_micros_per_mtok)
            + u128::from(output_tokens) * u128::from(self.output_micros_per_mtok);
        u64::try_from(total.div_ceil(1_000_000))
            .ok()
            .filter(|c| *c <= crate::contract::MAX_COUNTER)
            .ok_or_else(|| crate::contract::Violation::new("cost_micros", "invalid_amount", "the cost of this call is too large to record"))
    }
}

/// Whether going over a limit denies (`hard`) or records and flags (`soft`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// Deny and record nothing.
    #[default]
    Hard,
    /// Record and answer `over_limit_soft`.
    Soft,
}

/// What a plan grants for one feature key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Rule {
    /// On or off.
    Flag {
        /// Whether the feature is available.
        enabled: bool,
    },
    /// Counted uses per period; `limit: None` is unlimited.
    Metered {
        /// Maximum per window, `None` = unlimited.
        limit: Option<u64>,
        /// The window kind.
        period: Period,
        /// Hard or soft.
        #[serde(default)]
        enforcement: Enforcement,
        /// The fraction of each window's limit devices may hold between them as leases
        /// (protocol 2); the rest stays with the server. Default 1; 0 for a feature only a
        /// backend consumes.
        #[serde(default, skip_serializing_if = "Share::is_one")]
        offline_share: Share,
    },
    /// Each unit draws `cost` credits from the user's balance.
    Credits {
        /// Credits per unit.
        cost: u64,
    },
    /// A request rate limit, per device, never synced.
    Rate {
        /// Requests per window.
        limit: u64,
        /// Window length in seconds.
        window_secs: u64,
    },
    /// Caps summed AI cost (micros) per period.
    Budget {
        /// Maximum micros per window.
        limit_micros: u64,
        /// The window kind.
        period: Period,
        /// Hard or soft.
        #[serde(default)]
        enforcement: Enforcement,
        /// As for metered rules.
        #[serde(default, skip_serializing_if = "Share::is_one")]
        offline_share: Share,
    },
}

impl Rule {
    /// The period whose windows this rule counts in, if any.
    pub fn period(&self) -> Option<Period> {
        match self {
            Rule::Metered { period, .. } | Rule::Budget { period, .. } => Some(*period),
            _ => None,
        }
    }
    /// The fraction of a window's limit devices may hold as leases (1 for rules without one).
    pub fn offline_share(&self) -> Share {
        match self {
            Rule::Metered { offline_share, .. } | Rule::Budget { offline_share, .. } => *offline_share,
            _ => Share::ONE,
        }
    }
    /// Whether the rule lets the user use the feature at all (every rule but a disabled flag;
    /// limits and balances still apply).
    pub fn grants_access(&self) -> bool {
        !matches!(self, Rule::Flag { enabled: false })
    }
    /// The limit of a counted rule (`None` = unlimited or not counted).
    pub fn limit(&self) -> Option<u64> {
        match self {
            Rule::Metered { limit, .. } => *limit,
            Rule::Budget { limit_micros, .. } => Some(*limit_micros),
            Rule::Rate { limit, .. } => Some(*limit),
            _ => None,
        }
    }
}

/// Credits granted each billing period by a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncludedCredits {
    /// Credits per period.
    pub amount: u64,
    /// Whether unspent credits carry over to the next period.
    #[serde(default)]
    pub rollover: bool,
}

/// A plan: an id and its feature rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Plan id (`free`, `pro`, …).
    pub id: String,
    /// Credits granted each billing period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub included_credits: Option<IncludedCredits>,
    /// Feature key → rule.
    #[serde(default)]
    pub features: BTreeMap<String, Rule>,
    /// Where the plan ranks among paid plans (higher wins when a user has several); without
    /// it, the plan's position in the catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<i64>,
    /// The name to show (`"Pro"`), at most 64 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// A sentence or two for a paywall, at most 1,000 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A store in which products are sold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Store {
    /// Apple's App Store.
    AppStore,
    /// Google Play.
    Play,
    /// Stripe (the product id is the price id).
    Stripe,
}

impl Store {
    /// Every store.
    pub const ALL: [Store; 3] = [Store::AppStore, Store::Play, Store::Stripe];
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Store::AppStore => "app_store",
            Store::Play => "play",
            Store::Stripe => "stripe",
        }
    }
    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Store> {
        Store::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// What buying a product gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// The plan it gives (an auto-renewing subscription, or for ever with `lifetime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// A one-time purchase of the plan for ever.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lifetime: bool,
    /// Credits of a credit pack (consumable), granted once per transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<u64>,
}

/// A product sold in a store, mapped to what it grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// The store's product id (Stripe: the price id); unique per store.
    pub id: String,
    /// The store selling it.
    pub store: Store,
    /// What it grants.
    pub grants: Grants,
    /// Free trial days given at checkout (Stripe; the stores set their own offers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_days: Option<u32>,
    /// The price to show, as the app wants it shown (`"$4.99/month"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_price: Option<String>,
}

/// What a product is, for the code that applies a purchase of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductKind<'a> {
    /// An auto-renewing subscription to a plan.
    Subscription(&'a str),
    /// A plan for ever (one-time purchase).
    Lifetime(&'a str),
    /// A credit pack.
    Credits(u64),
}

impl Product {
    /// What this product is.
    pub fn kind(&self) -> ProductKind<'_> {
        match (&self.grants.plan, self.grants.credits) {
            (Some(p), _) if self.grants.lifetime => ProductKind::Lifetime(p),
            (Some(p), _) => ProductKind::Subscription(p),
            (None, c) => ProductKind::Credits(c.unwrap_or(0)),
        }
    }
}

/// Model pricing and plans.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Catalog {
    /// Model id → price.
    #[serde(default)]
    pub models: BTreeMap<String, ModelPrice>,
    /// The plans, in declaration order.
    #[serde(default)]
    pub plans: Vec<Plan>,
    /// The fraction of the credit balance devices may hold as leases (protocol 2; default 1).
    #[serde(default, skip_serializing_if = "Share::is_one")]
    pub credits_offline_share: Share,
    /// The products sold in the stores.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub products: Vec<Product>,
}

/// Id of the plan everyone falls back to.
pub const FREE_PLAN: &str = "free";

impl Catalog {
    /// Parses and validates a catalog; adds an empty `free` plan when none is declared.
    pub fn from_json(text: &str) -> Result<Catalog> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::catalog("$", format!("malformed JSON: {e}")))?;
        Catalog::from_value(&v)
    }

    /// Validates a catalog given as a JSON value.
    pub fn from_value(v: &Value) -> Result<Catalog> {
        let obj = v.as_object().ok_or_else(|| Error::catalog("$", "expected an object with `models` and `plans`"))?;
        for k in obj.keys() {
            if !["models", "plans", "credits_offline_share", "products"].contains(&k.as_str()) {
                return Err(Error::catalog(
                    k.as_str(),
                    "unknown field (expected `models`, `plans`, `credits_offline_share` or `products`)",
                ));
            }
        }
        let mut models = BTreeMap::new();
        if let Some(m) = obj.get("models").filter(|m| !m.is_null()) {
            let m = m.as_object().ok_or_else(|| Error::catalog("models", "expected an object of model prices"))?;
            for (name, price) in m {
                let path = format!("models.{name}");
                if name.is_empty() {
                    return Err(Error::catalog(path, "model id must not be empty"));
                }
                let p = price.as_object().ok_or_else(|| Error::catalog(&path, "expected an object"))?;
                known_fields(&path, p, &["input_micros_per_mtok", "output_micros_per_mtok"])?;
                models.insert(
                    name.clone(),
                    ModelPrice {
                        input_micros_per_mtok: uint(&path, p, "input_micros_per_mtok")?,
                        output_micros_per_mtok: uint(&path, p, "output_micros_per_mtok")?,
                    },
                );
            }
        }
        let mut plans = Vec::new();
        let mut seen = HashSet::new();
        if let Some(ps) = obj.get("plans").filter(|p| !p.is_null()) {
            let ps = ps.as_array().ok_or_else(|| Error::catalog("plans", "expected an array of plans"))?;
            for (i, p) in ps.iter().enumerate() {
                let plan = Plan::validate(&format!("plans[{i}]"), p)?;
                if !seen.insert(plan.id.clone()) {
                    return Err(Error::catalog(format!("plans[{i}].id"), format!("duplicate plan id {:?}", plan.id)));
                }
                plans.push(plan);
            }
        }
        let credits_offline_share = share("", obj)?;
        let mut c = Catalog { models, plans, credits_offline_share, products: Vec::new() };
        c.ensure_free();
        if let Some(ps) = obj.get("products").filter(|p| !p.is_null()) {
            let ps = ps.as_array().ok_or_else(|| Error::catalog("products", "expected an array of products"))?;
            let mut seen = HashSet::new();
            for (i, p) in ps.iter().enumerate() {
                let product = validate_product(&format!("products[{i}]"), p, &c)?;
                if !seen.insert((product.store, product.id.clone())) {
                    return Err(Error::catalog(
                        format!("products[{i}].id"),
                        format!("duplicate product id {:?} in store {}", product.id, product.store.as_str()),
                    ));
                }
                c.products.push(product);
            }
        }
        Ok(c)
    }

    /// The catalog used when an app gives none: a `free` plan without features.
    pub fn builtin() -> Catalog {
        let mut c = Catalog::default();
        c.ensure_free();
        c
    }

    fn ensure_free(&mut self) {
        if !self.plans.iter().any(|p| p.id == FREE_PLAN) {
            self.plans.push(Plan::empty_free());
        }
    }

    /// Whether some plan of the catalog knows `feature` (a device's catalog may be ahead).
    pub fn knows_feature(&self, feature: &str) -> bool {
        self.plans.iter().any(|p| p.features.contains_key(feature))
    }

    /// The plan with this id.
    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.id == id)
    }

    /// The product `id` of `store`.
    pub fn product(&self, store: Store, id: &str) -> Option<&Product> {
        self.products.iter().find(|p| p.store == store && p.id == id)
    }

    /// The rank of plan `id`: its `rank`, else its position in the catalog (later = higher);
    /// a plan the catalog does not know ranks below every plan.
    pub fn rank(&self, id: &str) -> i64 {
        self.plans.iter().position(|p| p.id == id).map_or(i64::MIN, |i| self.plans[i].rank.unwrap_or(i as i64))
    }

    /// The free plan (always present).
    pub fn free(&self) -> &Plan {
        static EMPTY: std::sync::OnceLock<Plan> = std::sync::OnceLock::new();
        self.plan(FREE_PLAN).unwrap_or_else(|| EMPTY.get_or_init(Plan::empty_free))
    }

    /// Inserts or replaces one plan (validated with [`Plan::from_json`] first).
    pub fn upsert(&mut self, plan: Plan) {
        match self.plans.iter_mut().find(|p| p.id == plan.id) {
            Some(p) => *p = plan,
            None => self.plans.push(plan),
        }
    }

    /// The catalog as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Plan {
    /// Parses and validates one plan (the body of `PUT /v1/admin/plans/{id}`).
    pub fn from_json(text: &str) -> Result<Plan> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::catalog("$", format!("malformed JSON: {e}")))?;
        Plan::validate("$", &v)
    }

    /// The built-in `free` plan of a catalog that names none: no features.
    fn empty_free() -> Plan {
        Plan { id: FREE_PLAN.into(), included_credits: None, features: BTreeMap::new(), rank: None, display_name: None, description: None }
    }

    /// Validates one plan value found at `path`.
    pub fn validate(path: &str, v: &Value) -> Result<Plan> {
        let o = v.as_object().ok_or_else(|| Error::catalog(path, "expected a plan object"))?;
        known_fields(path, o, &["id", "included_credits", "features", "rank", "display_name", "description"])?;
        let id = o
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 64)
            .ok_or_else(|| Error::catalog(format!("{path}.id"), "expected a non-empty string of at most 64 bytes"))?
            .to_string();
        let included_credits = match o.get("included_credits").filter(|c| !c.is_null()) {
            None => None,
            Some(c) => {
                let cp = format!("{path}.included_credits");
                let co = c.as_object().ok_or_else(|| Error::catalog(&cp, "expected {amount, rollover}"))?;
                known_fields(&cp, co, &["amount", "rollover"])?;
                let rollover = match co.get("rollover") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(Error::catalog(format!("{cp}.rollover"), "expected a boolean")),
                };
                Some(IncludedCredits { amount: uint(&cp, co, "amount")?, rollover })
            }
        };
        let mut features = BTreeMap::new();
        if let Some(f) = o.get("features").filter(|f| !f.is_null()) {
            let fp = format!("{path}.features");
            let f = f.as_object().ok_or_else(|| Error::catalog(&fp, "expected an object of feature rules"))?;
            for (key, rule) in f {
                let rp = format!("{fp}.{key}");
                if key.is_empty() || key.len() > 128 {
                    return Err(Error::catalog(rp, "feature key must be 1 to 128 bytes"));
                }
                if key.starts_with('$') {
                    return Err(Error::catalog(rp, "feature keys may not start with `$` (reserved for pools such as `$credits`)"));
                }
                features.insert(key.clone(), validate_rule(&rp, rule)?);
            }
        }
        let rank = match o.get("rank") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| Error::catalog(format!("{path}.rank"), "expected an integer"))?),
        };
        let display_name = opt_text(path, o, "display_name", 64)?;
        let description = opt_text(path, o, "description", 1000)?;
        Ok(Plan { id, included_credits, features, rank, display_name, description })
    }
}

fn validate_product(path: &str, v: &Value, catalog: &Catalog) -> Result<Product> {
    let o = v.as_object().ok_or_else(|| Error::catalog(path, "expected a product object"))?;
    known_fields(path, o, &["id", "store", "grants", "trial_days", "display_price"])?;
    let id = o
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .ok_or_else(|| Error::catalog(format!("{path}.id"), "expected a non-empty string of at most 255 bytes"))?
        .to_string();
    let sp = format!("{path}.store");
    let store = o
        .get("store")
        .and_then(Value::as_str)
        .and_then(Store::parse)
        .ok_or_else(|| Error::catalog(sp, "expected app_store, play or stripe"))?;
    let gp = format!("{path}.grants");
    let g = o.get("grants").and_then(Value::as_object).ok_or_else(|| Error::catalog(&gp, "expected {plan, lifetime?} or {credits}"))?;
    known_fields(&gp, g, &["plan", "lifetime", "credits"])?;
    let plan = match g.get("plan") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if catalog.plan(p).is_some() && p != FREE_PLAN => Some(p.clone()),
        Some(_) => return Err(Error::catalog(format!("{gp}.plan"), "expected the id of a paid plan of this catalog")),
    };
    let lifetime = match g.get("lifetime") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Error::catalog(format!("{gp}.lifetime"), "expected a boolean")),
    };
    let credits = match g.get("credits") {
        None | Some(Value::Null) => None,
        Some(_) => match uint(&gp, g, "credits")? {
            0 => return Err(Error::catalog(format!("{gp}.credits"), "must be at least 1")),
            n => Some(n),
        },
    };
    match (&plan, credits) {
        (Some(_), Some(_)) => return Err(Error::catalog(gp, "a product grants a plan or credits, not both")),
        (None, None) => return Err(Error::catalog(gp, "a product grants a plan or credits")),
        (None, Some(_)) if lifetime => return Err(Error::catalog(format!("{gp}.lifetime"), "only a plan can be granted for ever")),
        _ => {}
    }
    let trial_days = match o.get("trial_days") {
        None | Some(Value::Null) => None,
        Some(_) => {
            let d = uint(path, o, "trial_days")?;
            if plan.is_none() || lifetime || d == 0 || d > 730 {
                return Err(Error::catalog(format!("{path}.trial_days"), "1 to 730 days, on a subscription product only"));
            }
            Some(d as u32)
        }
    };
    let display_price = opt_text(path, o, "display_price", 64)?;
    Ok(Product { id, store, grants: Grants { plan, lifetime, credits }, trial_days, display_price })
}

fn validate_rule(path: &str, v: &Value) -> Result<Rule> {
    let o = v.as_object().ok_or_else(|| Error::catalog(path, "expected a rule object with a `type`"))?;
    let ty = o.get("type").and_then(Value::as_str).ok_or_else(|| Error::catalog(format!("{path}.type"), "missing rule type"))?;
    let rule = match ty {
        "flag" => {
            known_fields(path, o, &["type", "enabled"])?;
            let enabled =
                o.get("enabled").and_then(Value::as_bool).ok_or_else(|| Error::catalog(format!("{path}.enabled"), "expected a boolean"))?;
            Rule::Flag { enabled }
        }
        "metered" => {
            known_fields(path, o, &["type", "limit", "period", "enforcement", "offline_share"])?;
            let limit = match o.get("limit") {
                None => return Err(Error::catalog(format!("{path}.limit"), "missing limit (use null for unlimited)")),
                Some(Value::Null) => None,
                Some(_) => Some(uint(path, o, "limit")?),
            };
            Rule::Metered { limit, period: period(path, o)?, enforcement: enforcement(path, o)?, offline_share: share(path, o)? }
        }
        "credits" => {
            known_fields(path, o, &["type", "cost"])?;
            Rule::Credits { cost: uint(path, o, "cost")? }
        }
        "rate" => {
            known_fields(path, o, &["type", "limit", "window_secs"])?;
            let window_secs = uint(path, o, "window_secs")?;
            if window_secs == 0 {
                return Err(Error::catalog(format!("{path}.window_secs"), "must be at least 1"));
            }
            Rule::Rate { limit: uint(path, o, "limit")?, window_secs }
        }
        "budget" => {
            known_fields(path, o, &["type", "limit_micros", "period", "enforcement", "offline_share"])?;
            Rule::Budget {
                limit_micros: uint(path, o, "limit_micros")?,
                period: period(path, o)?,
                enforcement: enforcement(path, o)?,
                offline_share: share(path, o)?,
            }
        }
        other => {
            return Err(Error::catalog(
                format!("{path}.type"),
                format!("unknown rule type {other:?} (expected flag, metered, credits, rate or budget)"),
            ));
        }
    };
    Ok(rule)
}

/// The `offline_share` (or, at the top level, `credits_offline_share`) of an object: a number
/// from 0 to 1, default 1.
fn share(path: &str, o: &serde_json::Map<String, Value>) -> Result<Share> {
    let key = if path.is_empty() { "credits_offline_share" } else { "offline_share" };
    let p = if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    match o.get(key) {
        None | Some(Value::Null) => Ok(Share::ONE),
        Some(v) => v.as_f64().and_then(Share::from_f64).ok_or_else(|| Error::catalog(p, "expected a number from 0 to 1")),
    }
}

fn known_fields(path: &str, o: &serde_json::Map<String, Value>, allowed: &[&str]) -> Result<()> {
    match o.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(Error::catalog(format!("{path}.{k}"), format!("unknown field (expected one of {})", allowed.join(", ")))),
        None => Ok(()),
    }
}

/// An optional text field shown to users: absent or null, else 1 to `max` bytes.
fn opt_text(path: &str, o: &serde_json::Map<String, Value>, key: &str, max: usize) -> Result<Option<String>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= max => Ok(Some(s.clone())),
        Some(_) => Err(Error::catalog(format!("{path}.{key}"), format!("expected a string of 1 to {max} bytes"))),
    }
}

fn uint(path: &str, o: &serde_json::Map<String, Value>, key: &str) -> Result<u64> {
    let p = format!("{path}.{key}");
    match o.get(key) {
        None => Err(Error::catalog(p, "missing")),
        Some(v) => match v.as_u64() {
            Some(n) if n <= i64::MAX as u64 => Ok(n),
            _ if v.as_i64().is_some_and(|n| n < 0) => Err(Error::catalog(p, "must not be negative")),
            _ => Err(Error::catalog(p, "expected a non-negative integer")),
        },
    }
}

fn period(path: &str, o: &serde_json::Map<String, Value>) -> Result<Period> {
    let p = format!("{path}.period");
    o.get("period").and_then(Value::as_str).ok_or_else(|| Error::catalog(&p, "missing period"))?.parse().map_err(|e| Error::catalog(p, e))
}

fn enforcement(path: &str, o: &serde_json::Map<String, Value>) -> Result<Enforcement> {
    let p = format!("{path}.enforcement");
    match o.get("enforcement") {
        None | Some(Value::Null) => Ok(Enforcement::Hard),
        Some(Value::String(s)) if s == "hard" => Ok(Enforcement::Hard),
        Some(Value::String(s)) if s == "soft" => Ok(Enforcement::Soft),
        Some(other) => Err(Error::catalog(p, format!("unknown enforcement {other} (expected hard or soft)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"{"models": {"gpt-4o": {"input_micros_per_mtok": 2500000, "output_micros_per_mtok": 10000000}},
 "plans": [{"id": "free", "included_credits": {"amount": 100, "rollover": false}, "features": {
  "ai_chat":  {"type": "metered", "limit": 5, "period": "month", "enforcement": "hard"},
  "export":   {"type": "flag", "enabled": false},
  "images":   {"type": "credits", "cost": 10},
  "api":      {"type": "rate", "limit": 100, "window_secs": 60},
  "ai_spend": {"type": "budget", "limit_micros": 2000000, "period": "day", "enforcement": "hard"}}}]}"#;

    #[test]
    fn parses_the_wire_contract_example() {
        let c = Catalog::from_json(EXAMPLE).unwrap();
        let free = c.free();
        assert_eq!(free.features.len(), 5);
        assert_eq!(
            free.features["ai_chat"],
            Rule::Metered { limit: Some(5), period: Period::Month, enforcement: Enforcement::Hard, offline_share: Share::ONE }
        );
        assert_eq!(free.included_credits, Some(IncludedCredits { amount: 100, rollover: false }));
        assert_eq!(c.models["gpt-4o"].cost_micros(1000, 500), Ok(2500 + 5000));
        // Round trip through serde gives the same catalog.
        assert_eq!(Catalog::from_json(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn errors_name_the_path() {
        let cases = [
            (
                r#"{"plans":[{"id":"free"},{"id":"pro","features":{"api":{"type":"rate","limit":-1,"window_secs":60}}}]}"#,
                "plans[1].features.api.limit",
            ),
            (r#"{"plans":[{"id":"free","features":{"x":{"type":"meterd"}}}]}"#, "plans[0].features.x.type"),
            (
                r#"{"plans":[{"id":"free","features":{"x":{"type":"metered","limit":1,"period":"fortnight"}}}]}"#,
                "plans[0].features.x.period",
            ),
            (
                r#"{"plans":[{"id":"free","features":{"x":{"type":"metered","limit":1,"period":"day","enforcement":"maybe"}}}]}"#,
                "plans[0].features.x.enforcement",
            ),
            (r#"{"plans":[{"id":"a"},{"id":"a"}]}"#, "plans[1].id"),
            (r#"{"plans":[{"id":""}]}"#, "plans[0].id"),
            (r#"{"plans":[{"id":"a","features":{"x":{"type":"metered","period":"day"}}}]}"#, "plans[0].features.x.limit"),
            (r#"{"models":{"m":{"input_micros_per_mtok":1}}}"#, "models.m.output_micros_per_mtok"),
            (r#"{"plans":[], "extra": 1}"#, "extra"),
            (r#"[1]"#, "$"),
            (r#"{"plans": [ "#, "$"),
        ];
        for (json, want) in cases {
            match Catalog::from_json(json) {
                Err(Error::InvalidCatalog { path, .. }) => assert_eq!(path, want, "{json}"),
                other => panic!("{json}: expected a catalog error, got {other:?}"),
            }
        }
    }

    #[test]
    fn products_and_ranks() {
        let c = Catalog::from_json(
            r#"{"plans":[{"id":"free"},{"id":"team","rank":1},{"id":"pro"}],
                "products":[{"id":"pro_monthly","store":"app_store","grants":{"plan":"pro"},"trial_days":7,"display_price":"$4.99"},
                            {"id":"pro_monthly","store":"stripe","grants":{"plan":"pro"}},
                            {"id":"forever","store":"app_store","grants":{"plan":"team","lifetime":true}},
                            {"id":"credits_100","store":"play","grants":{"credits":100}}]}"#,
        )
        .unwrap();
        assert_eq!(c.product(Store::AppStore, "pro_monthly").map(Product::kind), Some(ProductKind::Subscription("pro")));
        assert_eq!(c.product(Store::AppStore, "forever").map(Product::kind), Some(ProductKind::Lifetime("team")));
        assert_eq!(c.product(Store::Play, "credits_100").map(Product::kind), Some(ProductKind::Credits(100)));
        assert!(c.product(Store::Play, "pro_monthly").is_none());
        assert_eq!((c.rank("free"), c.rank("team"), c.rank("pro")), (0, 1, 2));
        assert!(c.rank("gone") < c.rank("free"));
        assert_eq!(Catalog::from_json(&c.to_json()).unwrap(), c);
        let p = |products: &str| format!(r#"{{"plans":[{{"id":"pro"}}],"products":[{products}]}}"#);
        let cases = [
            (p(r#"{"id":"a","store":"itunes","grants":{"plan":"pro"}}"#), "products[0].store"),
            (p(r#"{"id":"a","store":"stripe","grants":{"plan":"gold"}}"#), "products[0].grants.plan"),
            (p(r#"{"id":"a","store":"stripe","grants":{"plan":"free"}}"#), "products[0].grants.plan"),
            (p(r#"{"id":"a","store":"stripe","grants":{"plan":"pro","credits":5}}"#), "products[0].grants"),
            (p(r#"{"id":"a","store":"stripe","grants":{}}"#), "products[0].grants"),
            (p(r#"{"id":"a","store":"stripe","grants":{"credits":0}}"#), "products[0].grants.credits"),
            (p(r#"{"id":"a","store":"stripe","grants":{"credits":5,"lifetime":true}}"#), "products[0].grants.lifetime"),
            (p(r#"{"id":"a","store":"stripe","grants":{"credits":5},"trial_days":3}"#), "products[0].trial_days"),
            (p(r#"{"id":"a","store":"stripe","grants":{"plan":"pro"},"trial_days":-3}"#), "products[0].trial_days"),
            (p(r#"{"id":"a","store":"stripe","grants":{"plan":"pro"},"display_price":7}"#), "products[0].display_price"),
            (p(r#"{"id":"a","store":"stripe","grants":{"plan":"pro"},"price":7}"#), "products[0].price"),
            (p(r#"{"id":"","store":"stripe","grants":{"plan":"pro"}}"#), "products[0].id"),
            (
                p(r#"{"id":"a","store":"stripe","grants":{"plan":"pro"}},{"id":"a","store":"stripe","grants":{"credits":1}}"#),
                "products[1].id",
            ),
            (r#"{"plans":[{"id":"pro","rank":"high"}]}"#.to_string(), "plans[0].rank"),
            (r#"{"plans":[{"id":"pro","display_name":""}]}"#.to_string(), "plans[0].display_name"),
            (format!(r#"{{"plans":[{{"id":"pro","description":"{}"}}]}}"#, "x".repeat(1001)), "plans[0].description"),
            (r#"{"products":{}}"#.to_string(), "products"),
        ];
        for (json, want) in cases {
            match Catalog::from_json(&json) {
                Err(Error::InvalidCatalog { path, .. }) => assert_eq!(path, want, "{json}"),
                other => panic!("{json}: expected a catalog error, got {other:?}"),
            }
        }
    }

    #[test]
    fn unlimited_and_builtin_free() {
        let c =
            Catalog::from_json(r#"{"plans":[{"id":"pro","features":{"x":{"type":"metered","limit":null,"period":"lifetime"}}}]}"#).unwrap();
        assert_eq!(c.plan("pro").unwrap().features["x"].limit(), None);
        assert!(c.plan("free").is_some());
        assert_eq!(Catalog::builtin().plans.len(), 1);
        assert!(Plan::from_json(r#"{"id":"team","features":{}}"#).is_ok());
    }
}
