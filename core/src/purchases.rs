//! Store purchases from the device: the account token the app binds a purchase to, and the
//! calls that post a store's proof (`POST /v1/purchases/apple`, `POST /v1/purchases/google`)
//! and store the answered device token in one SQLite transaction, so the plan or the credits
//! apply offline at once.
//!
//! Requests retry like sync's (network errors, 5xx, 429); a refusal (4xx, or 503
//! `store_unconfigured`) is [`Error::PurchaseRefused`] naming the server's code and changes
//! nothing on the device. The app finishes the store's transaction only after a call returned
//! `Ok`.

use crate::error::{Error, Result};
use crate::sync::{SyncOptions, check_server_keys, http_client, store_token, token_seen};
use crate::{Change, Store, Tally, contract, write_tx};
use serde::{Deserialize, Serialize};

/// One Google Play purchase: the product bought and Play's purchase token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GooglePurchase {
    /// The Play product id (a catalog `play` product).
    pub product_id: String,
    /// `Purchase.getPurchaseToken()`.
    pub purchase_token: String,
}

/// A store's proof of purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purchase {
    /// StoreKit 2 `Transaction.jwsRepresentation`s: one purchase, or every current one.
    Apple {
        /// The signed transactions.
        signed_transactions: Vec<String>,
    },
    /// Google Play Billing purchases.
    Google {
        /// The purchases.
        purchases: Vec<GooglePurchase>,
    },
}

impl Purchase {
    /// How many proofs it carries.
    fn len(&self) -> usize {
        match self {
            Purchase::Apple { signed_transactions } => signed_transactions.len(),
            Purchase::Google { purchases } => purchases.len(),
        }
    }

    /// The field naming its proofs on the wire.
    fn field(&self) -> &'static str {
        match self {
            Purchase::Apple { .. } => "signed_transactions",
            Purchase::Google { .. } => "purchases",
        }
    }

    /// The route it is posted to.
    fn path(&self) -> &'static str {
        match self {
            Purchase::Apple { .. } => "/v1/purchases/apple",
            Purchase::Google { .. } => "/v1/purchases/google",
        }
    }

    /// The same kind of proof with the proofs `range`.
    fn slice(&self, range: std::ops::Range<usize>) -> Purchase {
        match self {
            Purchase::Apple { signed_transactions } => Purchase::Apple { signed_transactions: signed_transactions[range].to_vec() },
            Purchase::Google { purchases } => Purchase::Google { purchases: purchases[range].to_vec() },
        }
    }
}

/// Body of a purchase request: the proofs and this device's id (answered a device token).
#[derive(Serialize)]
struct PurchaseRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    signed_transactions: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purchases: Option<&'a [GooglePurchase]>,
    device_id: &'a str,
}

impl<'a> PurchaseRequest<'a> {
    fn new(purchase: &'a Purchase, device_id: &'a str) -> Self {
        match purchase {
            Purchase::Apple { signed_transactions } => {
                PurchaseRequest { signed_transactions: Some(signed_transactions), purchases: None, device_id }
            }
            Purchase::Google { purchases } => PurchaseRequest { signed_transactions: None, purchases: Some(purchases), device_id },
        }
    }
}

/// What the server made of one purchase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseOutcome {
    /// The store.
    pub store: Store,
    /// The store's product id.
    #[serde(default)]
    pub product_id: Option<String>,
    /// The store's transaction id (App Store: the latest of the subscription).
    #[serde(default)]
    pub transaction_id: Option<String>,
    /// `active`, `trialing`, `past_due`, `canceled` for plans; `credited`, `refunded` for
    /// credit packs.
    pub status: String,
}

/// The answer of a purchase route: the entitlements body with its token, plus `purchases`.
#[derive(Deserialize)]
struct PurchaseAnswer {
    token: Option<String>,
    #[serde(default)]
    purchases: Vec<PurchaseOutcome>,
}

/// What a purchase call did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseReport {
    /// What the server made of each purchase.
    pub purchases: Vec<PurchaseOutcome>,
    /// Whether a new entitlements token was stored (the plan applies offline now).
    pub entitlements_updated: bool,
}

impl Tally {
    /// The account token of `user_id`: the server's user id (`uid` of the stored entitlements
    /// token). Apps pass it to the store when buying (App Store `appAccountToken`, Play
    /// `obfuscatedExternalAccountId`) so the purchase belongs to this account whoever restores
    /// it. Available after the user's first sync.
    pub fn account_token(&self, user_id: &str) -> Result<String> {
        let g = self.lock();
        let user = crate::users::get_user(&g.conn, user_id)?;
        let external_id = user.external_id.ok_or_else(|| Error::invalid(format!("user {user_id} is not signed in; sign_in first")))?;
        let token: Option<String> = g.conn.query_row("SELECT entitlements_token FROM users WHERE id = ?1", [user_id], |r| r.get(0))?;
        let token = token.ok_or_else(|| Error::invalid(format!("user {user_id} has no account token yet: sync once after sign_in")))?;
        check_server_keys(self.config.server_keys.as_deref())?;
        let keys = self.config.server_keys.as_deref().unwrap_or_default();
        Ok(crate::token::verify(&token, keys, &external_id)?.uid)
    }

    /// Posts `purchase` (1 to [`contract::MAX_PURCHASES`] proofs) with this device's id and
    /// stores the answered device token, so the plan or the credits apply offline at once.
    /// A refusal is [`Error::PurchaseRefused`] with the server's code; nothing changes then.
    pub async fn submit_purchase(&self, user_id: &str, purchase: Purchase, options: SyncOptions) -> Result<PurchaseReport> {
        contract::purchase_count(purchase.field(), purchase.len())?;
        let report = self.post_purchase(user_id, &purchase, &options).await?;
        self.notify(user_id, Change { usage: true, entitlements: report.entitlements_updated, settings: false });
        Ok(report)
    }

    /// Restores purchases: posts every current proof of the store (several requests when
    /// there are more than [`contract::MAX_PURCHASES`]). Without any proof it asks the server
    /// for a freshly signed token instead (a sync with `force_entitlements`), which brings
    /// every store's purchases bound to the account.
    pub async fn restore_purchases(&self, user_id: &str, purchase: Purchase, options: SyncOptions) -> Result<PurchaseReport> {
        let mut report = PurchaseReport::default();
        if purchase.len() == 0 {
            let synced = self.sync(user_id, SyncOptions { force_entitlements: true, ..options }).await?;
            report.entitlements_updated = synced.entitlements_updated;
            return Ok(report);
        }
        for start in (0..purchase.len()).step_by(contract::MAX_PURCHASES) {
            let chunk = purchase.slice(start..(start + contract::MAX_PURCHASES).min(purchase.len()));
            let r = self.post_purchase(user_id, &chunk, &options).await?;
            report.purchases.extend(r.purchases);
            report.entitlements_updated |= r.entitlements_updated;
        }
        self.notify(user_id, Change { usage: true, entitlements: report.entitlements_updated, settings: false });
        Ok(report)
    }

    /// One purchase request and the storing of its answer.
    async fn post_purchase(&self, user_id: &str, purchase: &Purchase, options: &SyncOptions) -> Result<PurchaseReport> {
        check_server_keys(self.config.server_keys.as_deref())?;
        let subject = {
            let g = self.lock();
            crate::users::get_user(&g.conn, user_id)?
                .external_id
                .ok_or_else(|| Error::invalid(format!("user {user_id} is not signed in; sign_in before buying")))?
        };
        let device_id = self.device_id();
        let body = PurchaseRequest::new(purchase, &device_id);
        let client = http_client(options)?;
        let url = format!("{}{}", options.server_url.trim_end_matches('/'), purchase.path());
        let answer: PurchaseAnswer = self
            .post(&client, &url, &options.bearer().await?, &body, &options.retry)
            .await
            .map_err(|e| self.post_failed(user_id, e, |status, code, message| Error::PurchaseRefused { status, code, message }))?;
        let token = answer.token.ok_or_else(|| Error::Server {
            status: 200,
            code: "bad_response".into(),
            message: "the purchase answer carries no entitlements token".into(),
        })?;
        let keys = self.config.server_keys.as_deref().unwrap_or_default();
        let claims = crate::token::verify(&token, keys, &subject)?;
        let mut g = self.lock();
        let now = self.now(&g);
        let stored = write_tx(&mut g.conn, |tx| store_token(tx, user_id, &device_id, &token, &claims, now))?;
        if stored {
            token_seen(&mut g, &claims);
        }
        Tally::forget_access(&mut g, user_id);
        Ok(PurchaseReport { purchases: answer.purchases, entitlements_updated: stored })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(p: &Purchase) -> serde_json::Value {
        serde_json::to_value(PurchaseRequest::new(p, "phone")).unwrap()
    }

    #[test]
    fn each_store_gets_its_own_request_shape_and_route() {
        let apple = Purchase::Apple { signed_transactions: vec!["jws".into()] };
        assert_eq!(body(&apple), json!({"signed_transactions": ["jws"], "device_id": "phone"}));
        assert_eq!(apple.path(), "/v1/purchases/apple");
        let google = Purchase::Google { purchases: vec![GooglePurchase { product_id: "pro".into(), purchase_token: "tok".into() }] };
        assert_eq!(body(&google), json!({"purchases": [{"product_id": "pro", "purchase_token": "tok"}], "device_id": "phone"}));
        assert_eq!(google.path(), "/v1/purchases/google");
    }

    #[test]
    fn a_restore_splits_its_proofs_into_requests_of_the_contract_size() {
        let many = Purchase::Apple { signed_transactions: (0..contract::MAX_PURCHASES + 1).map(|i| i.to_string()).collect() };
        assert!(contract::purchase_count(many.field(), many.len()).is_err(), "too many for one request");
        let tail = many.slice(contract::MAX_PURCHASES..many.len());
        assert_eq!(tail, Purchase::Apple { signed_transactions: vec![contract::MAX_PURCHASES.to_string()] });
        assert!(contract::purchase_count("signed_transactions", 0).is_err());
    }
}
