//! Store purchases for the foreign side: the account token to bind a purchase to, and
//! `submit_purchase` / `restore_purchases` (async: Swift `async throws`, Kotlin `suspend`).

use crate::Tally;
use crate::error::{TallyError, core as call};
use crate::sync::{SyncOptions, spawned};
use tally_core as core;

/// One Google Play purchase: the product bought and Play's purchase token.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct GooglePurchase {
    /// The Play product id.
    pub product_id: String,
    /// `Purchase.getPurchaseToken()`.
    pub purchase_token: String,
}

/// A store's proof of purchase.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum Purchase {
    /// StoreKit 2 `Transaction.jwsRepresentation`s: one purchase, or every current one.
    Apple { signed_transactions: Vec<String> },
    /// Google Play Billing purchases.
    Google { purchases: Vec<GooglePurchase> },
}

impl From<Purchase> for core::Purchase {
    fn from(p: Purchase) -> Self {
        match p {
            Purchase::Apple { signed_transactions } => core::Purchase::Apple { signed_transactions },
            Purchase::Google { purchases } => core::Purchase::Google {
                purchases: purchases
                    .into_iter()
                    .map(|g| core::GooglePurchase { product_id: g.product_id, purchase_token: g.purchase_token })
                    .collect(),
            },
        }
    }
}

/// What the server made of one purchase.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct PurchaseOutcome {
    /// The store: `app_store`, `play` or `stripe`.
    pub store: String,
    /// The store's product id.
    pub product_id: Option<String>,
    /// The store's transaction id.
    pub transaction_id: Option<String>,
    /// `active`, `trialing`, `past_due`, `canceled` for plans; `credited`, `refunded` for packs.
    pub status: String,
}

/// What a purchase call did.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct PurchaseReport {
    /// What the server made of each purchase.
    pub purchases: Vec<PurchaseOutcome>,
    /// Whether a new entitlements token was stored (the plan applies offline now).
    pub entitlements_updated: bool,
}

impl From<core::PurchaseReport> for PurchaseReport {
    fn from(r: core::PurchaseReport) -> Self {
        PurchaseReport {
            purchases: r
                .purchases
                .into_iter()
                .map(|p| PurchaseOutcome {
                    store: p.store.as_str().to_string(),
                    product_id: p.product_id,
                    transaction_id: p.transaction_id,
                    status: p.status,
                })
                .collect(),
            entitlements_updated: r.entitlements_updated,
        }
    }
}

#[uniffi::export]
impl Tally {
    /// The account token of the user (the server's user id): pass it to the store when buying
    /// (App Store `appAccountToken`, Play `obfuscatedExternalAccountId`). Available after the
    /// user's first sync.
    pub fn account_token(&self, user_id: String) -> Result<String, TallyError> {
        call(|| self.inner.account_token(&user_id))
    }
}

#[uniffi::export(async_runtime = "tokio")]
impl Tally {
    /// Posts a store purchase and stores the answered token, so the plan applies offline at
    /// once. Finish the store transaction only after this returned; a refusal is
    /// `PurchaseRefused` naming the server's code and changes nothing.
    pub async fn submit_purchase(&self, user_id: String, purchase: Purchase, options: SyncOptions) -> Result<PurchaseReport, TallyError> {
        let inner = self.inner.clone();
        let (purchase, options) = (core::Purchase::from(purchase), core::SyncOptions::try_from(options)?);
        spawned("purchase", async move { inner.submit_purchase(&user_id, purchase, options).await }).await.map(Into::into)
    }

    /// Restores purchases: posts every current proof of the store (without any, asks the
    /// server for a freshly signed token).
    pub async fn restore_purchases(&self, user_id: String, purchase: Purchase, options: SyncOptions) -> Result<PurchaseReport, TallyError> {
        let inner = self.inner.clone();
        let (purchase, options) = (core::Purchase::from(purchase), core::SyncOptions::try_from(options)?);
        spawned("restore", async move { inner.restore_purchases(&user_id, purchase, options).await }).await.map(Into::into)
    }
}
