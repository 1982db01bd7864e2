//! The console's plans page: the catalog in effect — every plan with its rank, included credits
//! and feature rules — and the store products that sell plans and credit packs.

use super::{ConsoleError, Layout, Operator, render};
use crate::AppState;
use askama::Template;
use axum::extract::State;
use axum::response::Response;
use tally_core::Rule;

struct FeatureRow {
    key: String,
    kind: &'static str,
    rule: String,
}

struct PlanRow {
    id: String,
    name: String,
    rank: i64,
    included_credits: String,
    features: Vec<FeatureRow>,
}

struct ProductRow {
    id: String,
    store: String,
    grants: String,
    trial_days: String,
    display_price: String,
}

#[derive(Template)]
#[template(path = "console/plans.html")]
struct PlansPage {
    layout: Layout,
    version: i64,
    plans: Vec<PlanRow>,
    products: Vec<ProductRow>,
}

fn enforcement(e: &tally_core::catalog::Enforcement) -> &'static str {
    match e {
        tally_core::catalog::Enforcement::Hard => "hard",
        tally_core::catalog::Enforcement::Soft => "soft",
    }
}

/// A rule in a few words (`5 per month, hard`).
fn describe(rule: &Rule) -> (&'static str, String) {
    match rule {
        Rule::Flag { enabled } => ("flag", if *enabled { "enabled" } else { "disabled" }.to_string()),
        Rule::Metered { limit, period, enforcement: e, .. } => {
            let limit = limit.map_or_else(|| "unlimited".to_string(), |l| l.to_string());
            ("metered", format!("{limit} per {}, {}", period.as_str(), enforcement(e)))
        }
        Rule::Credits { cost } => ("credits", format!("{cost} credits per unit")),
        Rule::Rate { limit, window_secs } => ("rate", format!("{limit} per {window_secs} s per device")),
        Rule::Budget { limit_micros, period, enforcement: e, .. } => {
            ("budget", format!("{limit_micros} micros of AI cost per {}, {}", period.as_str(), enforcement(e)))
        }
    }
}

/// `GET /console/plans`: the catalog and its products.
pub async fn show(State(state): State<AppState>, op: Operator) -> Result<Response, ConsoleError> {
    let client = state.pool.get().await?;
    let (version, catalog) = state.catalog.current(&client).await?;
    let plans = catalog
        .plans
        .iter()
        .map(|p| PlanRow {
            id: p.id.clone(),
            name: p.display_name.clone().unwrap_or_default(),
            rank: catalog.rank(&p.id),
            included_credits: p
                .included_credits
                .as_ref()
                .map_or_else(|| "—".to_string(), |c| format!("{} per window{}", c.amount, if c.rollover { ", rolling over" } else { "" })),
            features: p
                .features
                .iter()
                .map(|(k, r)| {
                    let (kind, rule) = describe(r);
                    FeatureRow { key: k.clone(), kind, rule }
                })
                .collect(),
        })
        .collect();
    let products = catalog
        .products
        .iter()
        .map(|p| ProductRow {
            id: p.id.clone(),
            store: p.store.as_str().to_string(),
            grants: match (&p.grants.plan, p.grants.lifetime, p.grants.credits) {
                (Some(plan), true, _) => format!("plan {plan} for ever"),
                (Some(plan), false, _) => format!("plan {plan}"),
                (None, _, Some(c)) => format!("{c} credits"),
                _ => "—".to_string(),
            },
            trial_days: p.trial_days.map_or_else(|| "—".to_string(), |d| d.to_string()),
            display_price: p.display_price.clone().unwrap_or_default(),
        })
        .collect();
    render(&PlansPage { layout: Layout::new(&op, "/console/plans"), version, plans, products })
}
