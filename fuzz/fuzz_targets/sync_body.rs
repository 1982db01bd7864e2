//! `POST /v1/sync` bodies: the server's parsing and limits (`sync::parse_body`), then each
//! event's validation (`sync::sort_events`), the profile and settings checks and the cursor.
//! Properties: nothing panics; every event of an accepted body ends up accepted, voided or
//! rejected exactly once; an accepted event satisfies the wire contract; an accepted HLC
//! prints back as it was sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_core::contract;
use tally_core::hlc::Hlc;
use tally_server::{settings, sync, users};

fuzz_target!(|data: &[u8]| {
    let config = tally_fuzz::config();
    let Ok(req) = sync::parse_body(data, config.min_protocol, config.max_batch_events) else { return };
    assert!(req.events.len() <= config.max_batch_events as usize);
    assert!(contract::device_id(&req.device_id).is_ok());
    let sorted = sync::sort_events(&req);
    assert_eq!(sorted.events.len() + sorted.voids.len() + sorted.rejected.len(), req.events.len(), "each event is sorted once");
    let unsigned = |n: Option<i64>| n.map(|n| u64::try_from(n).unwrap_or_else(|_| panic!("a negative count was accepted: {n}")));
    for e in &sorted.events {
        assert!(!e.id.is_nil());
        let amount = unsigned(Some(e.amount)).unwrap_or_default();
        let usage = contract::usage(
            &e.feature,
            amount,
            e.model.as_deref(),
            unsigned(e.input_tokens),
            unsigned(e.output_tokens),
            e.metadata.as_ref(),
        );
        assert!(usage.is_ok(), "an accepted event breaks the contract: {usage:?}");
        assert!(contract::occurred_at(e.occurred_at).is_ok());
    }
    if let Some(p) = &req.profile {
        let (ok, refused) = users::split_profile(p);
        assert!(ok.display_name.is_none() || refused.iter().all(|r| r.field != "display_name"));
    }
    for c in &req.settings_changes {
        if settings::check(c).is_ok() {
            let h = Hlc::parse(&c.hlc).unwrap_or_else(|| panic!("an accepted change has an HLC: {:?}", c.hlc));
            assert_eq!(h.to_string(), c.hlc, "an accepted HLC prints back as sent");
        }
    }
    assert!(settings::parse_cursor(req.cursor.as_deref()) >= 0);
});
