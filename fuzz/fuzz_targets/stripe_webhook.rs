//! Stripe webhooks: the `Stripe-Signature` header and the body (`webhook::verified_payload`,
//! what the route runs before anything else), then the event envelope (`Event::from_value`)
//! and the objects read from it (subscriptions, one-time Checkout Sessions). Raw inputs are a
//! header line then the body; signed inputs are a body the target signs with the endpoint
//! secret at the server's time. Properties: nothing panics; a correctly signed body is
//! refused only as malformed JSON; the same signature outside the tolerance is stale; an
//! accepted header's timestamp is within the tolerance.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_fuzz::{Input, STRIPE_SECRET, catalog, config, now, split};
use tally_server::billing::{self, one_time, signature, state, webhook};
use tally_server::error::ApiError;

fn read_event(v: &serde_json::Value) {
    let Ok(ev) = webhook::Event::from_value(v) else { return };
    assert!(!ev.id.is_empty() && ev.id.len() <= 255);
    let _ = ev.customer();
    let _ = one_time::is_one_time(&ev.object);
    let prices = billing::prices(config(), catalog());
    if let Ok(sub) = state::parse_subscription(&ev.object, ev.created, &ev.id, &prices) {
        let _ = state::effective(&sub, Some(ev.created));
        assert!(!state::supersedes(&sub, &sub), "a state supersedes itself");
    }
}

fuzz_target!(|data: &[u8]| {
    let secrets = vec![STRIPE_SECRET.to_string()];
    let t = now().timestamp();
    let tolerance = config().stripe_webhook_tolerance_secs;
    match split(data) {
        None => {}
        Some(Input::Raw(bytes)) => {
            let (header, body) = match bytes.iter().position(|b| *b == b'\n') {
                Some(i) => (&bytes[..i], &bytes[i + 1..]),
                None => (bytes, &[][..]),
            };
            if let Ok(v) = webhook::verified_payload(Some(header), body, &secrets, t, tolerance) {
                read_event(&v);
            }
            if let Ok(at) = signature::verify(Some(header), body, &secrets, t, tolerance) {
                assert!(t.abs_diff(at) <= tolerance);
            }
        }
        Some(Input::Signed(body)) => {
            let header = format!("t={t},v1={}", signature::sign(STRIPE_SECRET, t, body));
            match webhook::verified_payload(Some(header.as_bytes()), body, &secrets, t, tolerance) {
                Ok(v) => read_event(&v),
                Err(ApiError::BadRequest("malformed_json", _)) => assert!(serde_json::from_slice::<serde_json::Value>(body).is_err()),
                Err(e) => panic!("a correctly signed body was refused: {e:?}"),
            }
            let late = i64::try_from(tolerance).unwrap_or(i64::MAX).saturating_add(1);
            let stale = signature::verify(Some(header.as_bytes()), body, &secrets, t.saturating_add(late), tolerance);
            assert!(matches!(stale, Err(signature::SignatureError::Stale(..))), "{stale:?}");
        }
    }
});
