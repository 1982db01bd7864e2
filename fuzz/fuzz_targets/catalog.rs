//! The plan catalog (`Catalog::from_json`, the `--plans` file and `PUT /v1/admin/plans`) and
//! one plan (`Plan::from_json`, `PUT /v1/admin/plans/{id}`). Properties: nothing panics; an
//! accepted catalog or plan serialises and parses back to the same value; an accepted catalog
//! always has the free plan.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_core::Catalog;
use tally_core::catalog::{FREE_PLAN, Plan};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = Catalog::from_json(text) {
        assert!(c.plan(FREE_PLAN).is_some(), "an accepted catalog has the free plan");
        let json = c.to_json();
        match Catalog::from_json(&json) {
            Ok(again) => assert_eq!(again, c, "the catalog changed through {json}"),
            Err(e) => panic!("an accepted catalog does not parse back: {e}\n{json}"),
        }
        for p in &c.plans {
            let _ = c.rank(&p.id);
        }
    }
    if let Ok(p) = Plan::from_json(text) {
        let json = serde_json::to_string(&p).unwrap_or_else(|e| panic!("a plan does not serialise: {e}"));
        match Plan::from_json(&json) {
            Ok(again) => assert_eq!(again, p, "the plan changed through {json}"),
            Err(e) => panic!("an accepted plan does not parse back: {e}\n{json}"),
        }
    }
});
