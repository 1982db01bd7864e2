//! Answers of the Play Developer API: the status and body (`google_api::read_answer`), a
//! subscription (`SubscriptionV2::from_answer`, `Token::from_subscription`) or a one-time
//! product (`ProductPurchase::from_answer`, `Token::from_product`), and the state computed from
//! the token (`google::state_of`). An input is the HTTP status on its first line, then the
//! body. Properties: nothing panics; only a 2xx answer is read; a token keeps the purchase
//! token and product asked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use tally_fuzz::{catalog, now};
use tally_server::billing::google::{self, Token};
use tally_server::billing::google_api::{ProductPurchase, SubscriptionV2, read_answer};

const TOKEN: &str = "fuzz-purchase-token";

fn settle(t: &Token) {
    assert_eq!(t.purchase_token, TOKEN);
    let voids: HashMap<_, _> = t.order_id.iter().map(|o| (o.clone(), now())).collect();
    let _ = google::state_of(TOKEN, std::slice::from_ref(t), &HashMap::new(), catalog(), now());
    let _ = google::state_of(TOKEN, std::slice::from_ref(t), &voids, catalog(), now());
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (status, body) = text.split_once('\n').unwrap_or((text, ""));
    let Ok(status) = status.trim().parse::<u16>() else { return };
    let Ok(v) = read_answer(status, body) else { return };
    assert!((200..=299).contains(&status), "a {status} answer was read");
    if let Ok(s) = SubscriptionV2::from_answer(v.clone()) {
        for product in [None, Some("pro_monthly")] {
            if let Ok(t) = Token::from_subscription(TOKEN, product, s.clone(), now()) {
                if let Some(p) = product {
                    assert_eq!(t.product_id, p);
                }
                settle(&t);
            }
        }
    }
    if let Ok(p) = ProductPurchase::from_answer(v) {
        for product in ["pro_forever", "credits_100"] {
            let t = Token::from_product(TOKEN, product, p.clone(), now());
            assert_eq!(t.product_id, product);
            settle(&t);
        }
    }
});
