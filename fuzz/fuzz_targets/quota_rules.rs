//! Quota rule documents (Coze's create/update bodies and stored rules) never panic when
//! decoded, validated or turned into a rule set.
#![no_main]
use libfuzzer_sys::fuzz_target;
use policy::quota::{CreateLimitation, Rule, RuleSet, UpdateLimitation};

fuzz_target!(|data: &[u8]| {
    if let Ok(create) = serde_json::from_slice::<CreateLimitation>(data) {
        if let Ok(rule) = create.into_rule("b1".into()) {
            let _ = rule.window(1_800_000_000);
            let _ = RuleSet::new(vec![rule]);
        }
    }
    if let Ok(update) = serde_json::from_slice::<UpdateLimitation>(data) {
        let _ = update;
    }
    if let Ok(rules) = serde_json::from_slice::<Vec<Rule>>(data) {
        let _ = RuleSet::new(rules);
    }
});
