//! Google Play's Pub/Sub pushes: the body as the webhook route reads it
//! (`extract::json_body::<PushBody>`), then the Real-time Developer Notification inside
//! (`PushBody::notification`: base64 `message.data`, JSON). Properties: nothing panics; an
//! accepted notification has one message id (`messageId` or `message_id`, or both agreeing) of 1 to 128 characters and purchase tokens of 1 to
//! `MAX_TOKEN_LEN` bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_server::billing::google::MAX_TOKEN_LEN;
use tally_server::billing::google_push::PushBody;
use tally_server::extract::json_body;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = json_body::<PushBody>(data) else { return };
    let Ok(n) = body.notification() else { return };
    // An accepted push has one message id (either spelling, or both agreeing) of 1 to 128 characters.
    let id = body.message.id().expect("an accepted notification has a message id");
    assert!(!id.is_empty() && id.len() <= 128, "message id {id:?}");
    let tokens = [
        n.subscription_notification.as_ref().map(|s| s.purchase_token.as_str()),
        n.one_time_product_notification.as_ref().map(|s| s.purchase_token.as_str()),
        n.voided_purchase_notification.as_ref().map(|s| s.purchase_token.as_str()),
    ];
    for t in tokens.into_iter().flatten() {
        assert!(!t.is_empty() && t.len() <= MAX_TOKEN_LEN);
    }
});
