use super::*;
use crate::decision::DenyReason;
use crate::ids::DeviceId;
use crate::metering::Usage;
use proptest::prelude::*;

/// 2025-03-12T00:00:00Z.
const T0: u64 = 1_741_737_600;
const DAY: u64 = 86_400;

fn dev(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn rule(
    id: &str,
    entity_type: EntityType,
    entity_id: &str,
    benefit_type: BenefitType,
    limit: u64,
    trigger_unit: TriggerUnit,
    trigger_time: u32,
) -> Rule {
    Rule {
        benefit_id: id.to_owned(),
        entity_type,
        entity_id: entity_id.to_owned(),
        benefit_type,
        limit,
        active_mode: ActiveMode::AbsoluteTime,
        started_at: T0,
        ended_at: FOREVER,
        status: RuleStatus::Valid,
        trigger_unit,
        trigger_time,
    }
}

fn single(id: &str, device: &str, b: BenefitType, limit: u64, unit: TriggerUnit) -> Rule {
    rule(id, EntityType::SingleDevice, device, b, limit, unit, 1)
}

fn ent(id: &str, b: BenefitType, limit: u64, unit: TriggerUnit) -> Rule {
    rule(id, EntityType::EnterpriseAllDevices, "", b, limit, unit, 1)
}

fn set(rules: Vec<Rule>) -> RuleSet {
    RuleSet::new(rules).unwrap()
}

fn ids(rs: &RuleSet, d: &DeviceId, now: u64) -> Vec<String> {
    let mut v: Vec<String> = rs
        .applicable(d, now)
        .map(|r| r.benefit_id.clone())
        .collect();
    v.sort();
    v
}

fn requests(n: u64) -> Consumption {
    Consumption {
        requests: n,
        ..Consumption::default()
    }
}

fn tokens(input: u64, output: u64) -> Consumption {
    Consumption::request(Usage {
        llm_input_tokens: input,
        llm_output_tokens: output,
        ..Usage::default()
    })
}

fn ledger() -> QuotaLedger {
    QuotaLedger::new(LedgerPolicy::default())
}

fn used(l: &QuotaLedger, d: &DeviceId, b: BenefitType, k: RuleKind) -> (u64, u64) {
    l.counter(d, b, k).map_or((0, 0), |c| (c.used, c.reserved))
}

// ---------------------------------------------------------------- rules: JSON and validation

#[test]
fn rule_json_matches_coze_list_item() {
    let json = r#"{"benefit_id": 7485, "entity_type": "single_device", "entity_id": "SN12345",
        "benefit_type": "resource_point", "limit": 100, "active_mode": "absolute_time",
        "started_at": 1741708800, "ended_at": 253402300799, "status": "valid",
        "trigger_unit": "day", "trigger_time": 1}"#;
    let r: Rule = serde_json::from_str(json).unwrap();
    assert_eq!(r.benefit_id, "7485");
    assert_eq!(r.kind(), RuleKind::Periodic);
    assert_eq!(r.period_s(), Some(DAY));
    assert_eq!(r.limit_base(), 100_000_000);
    r.validate().unwrap();
    let back = serde_json::to_value(&r).unwrap();
    assert_eq!(back["benefit_id"], "7485");
    assert_eq!(back["entity_type"], "single_device");
    assert_eq!(back["trigger_unit"], "day");
    assert_eq!(back["benefit_type"], "resource_point");

    // Defaults: status valid, trigger_unit never, trigger_time 1; Java aliases accepted.
    let r: Rule = serde_json::from_str(
        r#"{"benefit_id":"b","entity_type":"enterprise_all_identifiers","benefit_type":"llm_tokens",
            "limit":5,"started_at":0,"ended_at":10}"#,
    )
    .unwrap();
    assert_eq!(r.entity_type, EntityType::EnterpriseAllCustomConsumers);
    assert_eq!(r.status, RuleStatus::Valid);
    assert_eq!(r.trigger_unit, TriggerUnit::Never);
    assert_eq!(r.trigger_time, 1);
    assert_eq!(
        serde_json::to_value(r).unwrap()["entity_type"],
        "enterprise_all_custom_consumers"
    );
    let r: Rule = serde_json::from_str(
        r#"{"benefit_id":"c","entity_type":"single_identifier","entity_id":"u1","benefit_type":"tts_chars",
            "limit":5,"started_at":0,"ended_at":10}"#,
    )
    .unwrap();
    assert_eq!(r.entity_type, EntityType::SingleCustomConsumer);

    // Closed benefit types.
    assert!(
        serde_json::from_str::<Rule>(
            r#"{"benefit_id":"b","entity_type":"single_device","entity_id":"x","benefit_type":"gold",
                "limit":5,"started_at":0,"ended_at":10}"#
        )
        .is_err()
    );
    for b in BenefitType::ALL {
        let s = serde_json::to_string(&b).unwrap();
        assert_eq!(s, format!("\"{}\"", b.as_str()));
        assert_eq!(serde_json::from_str::<BenefitType>(&s).unwrap(), b);
    }
}

#[test]
fn create_and_update_requests() {
    let req: CreateLimitation = serde_json::from_str(
        r#"{ "entity_type": "single_device", "entity_id": "SN12345",
             "benefit_info": { "benefit_type": "voice_unified_duration_system", "active_mode": "absolute_time",
                               "started_at": 1741708800, "ended_at": 253402300799,
                               "limit": 600, "status": "valid", "trigger_unit": "day", "trigger_time": 1 } }"#,
    )
    .unwrap();
    let r = req.into_rule("b1".to_owned()).unwrap();
    assert_eq!(r.entity_id, "SN12345");
    assert_eq!(r.limit_base(), 600_000); // seconds → ms

    let bad: CreateLimitation = serde_json::from_str(
        r#"{ "entity_type": "single_device",
             "benefit_info": { "benefit_type": "requests", "started_at": 10, "ended_at": 5,
                               "limit": 1, "trigger_unit": "hour", "trigger_time": 0 } }"#,
    )
    .unwrap();
    let errs = bad.into_rule("b2".to_owned()).unwrap_err();
    let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "entity_id",
            "benefit_info.ended_at",
            "benefit_info.trigger_time"
        ]
    );
    let msg = errs.to_string();
    assert!(msg.contains("invalid parameter benefit_info.trigger_time: must be >= 1"));
    assert!(msg.contains("must be greater than started_at (10), got 5"));

    let upd: UpdateLimitation =
        serde_json::from_str(r#"{"limit": 900, "status": "frozen"}"#).unwrap();
    let r2 = r.updated(&upd).unwrap();
    assert_eq!((r2.limit, r2.status), (900, RuleStatus::Frozen));
    assert_eq!(r2.entity_id, r.entity_id);
    // Entity and benefit type are immutable.
    assert!(serde_json::from_str::<UpdateLimitation>(r#"{"benefit_type": "requests"}"#).is_err());
    let e = r
        .updated(&UpdateLimitation {
            ended_at: Some(FOREVER + 1),
            ..UpdateLimitation::default()
        })
        .unwrap_err();
    assert_eq!(e.0[0].field, "ended_at");
    assert_eq!(e.0[0].kind, RuleErrorKind::EndAfterForever);
}

#[test]
fn validation_reports_everything() {
    let mut r = single(
        "",
        "bad id",
        BenefitType::ResourcePoint,
        u64::MAX,
        TriggerUnit::Day,
    );
    r.trigger_time = 0;
    let errs = r.validate().unwrap_err();
    let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["benefit_id", "entity_id", "limit", "trigger_time"]);
    assert!(matches!(
        errs.0[2].kind,
        RuleErrorKind::LimitTooLarge { max } if max == u64::MAX / 1_000_000
    ));
    // trigger_time is meaningless for cumulative rules.
    let mut r = single("b", "d1", BenefitType::Requests, 1, TriggerUnit::Never);
    r.trigger_time = 0;
    r.validate().unwrap();
}

#[test]
fn rule_set_constraints() {
    // One cumulative + one periodic per enterprise scope and benefit type.
    let ok = RuleSet::new(vec![
        ent("e1", BenefitType::LlmTokens, 10, TriggerUnit::Never),
        ent("e2", BenefitType::LlmTokens, 10, TriggerUnit::Day),
        ent("e3", BenefitType::Requests, 10, TriggerUnit::Day),
    ]);
    assert!(ok.is_ok());
    let errs = RuleSet::new(vec![
        ent("e1", BenefitType::LlmTokens, 10, TriggerUnit::Day),
        ent("e2", BenefitType::LlmTokens, 10, TriggerUnit::Hour),
        ent("e1", BenefitType::Requests, 10, TriggerUnit::Day),
    ])
    .unwrap_err();
    assert_eq!(errs.0.len(), 2);
    assert_eq!(errs.0[0].field, "rules[1].trigger_unit");
    assert!(errs.0[0].to_string().contains("at most one periodic rule"));
    assert!(matches!(
        errs.0[1].kind,
        RuleErrorKind::DuplicateBenefitId(_)
    ));

    // Frozen counts, cancelled does not.
    let mut frozen = ent("e1", BenefitType::LlmTokens, 10, TriggerUnit::Day);
    frozen.status = RuleStatus::Frozen;
    let mut cancelled = frozen.clone();
    cancelled.status = RuleStatus::Cancel;
    cancelled.benefit_id = "e0".into();
    let e2 = ent("e2", BenefitType::LlmTokens, 10, TriggerUnit::Day);
    assert!(RuleSet::new(vec![frozen.clone(), e2.clone()]).is_err());
    let rs = set(vec![cancelled, e2.clone()]);
    // admits: a second periodic enterprise rule is refused, replacing the same id is fine.
    assert!(rs.admits(&frozen).is_err());
    let mut e2b = e2.clone();
    e2b.limit = 99;
    rs.admits(&e2b).unwrap();

    // Device rules of one benefit/kind may not overlap; consecutive ones may.
    let mut a = single("a", "d1", BenefitType::Requests, 1, TriggerUnit::Day);
    a.ended_at = T0 + 10 * DAY;
    let mut b = single("b", "d1", BenefitType::Requests, 1, TriggerUnit::Day);
    b.started_at = T0 + 10 * DAY;
    let rs = set(vec![a.clone(), b.clone()]);
    let mut c = b.clone();
    c.benefit_id = "c".into();
    c.started_at = T0 + 5 * DAY;
    let e = rs.admits(&c).unwrap_err();
    assert!(matches!(
        e.0[0].kind,
        RuleErrorKind::DeviceRuleOverlap { .. }
    ));
    assert!(RuleSet::new(vec![a, b, c]).is_err());
}

/// `with` is how the gateway changes one rule (admin API, cluster): the result must be the
/// set a rebuild would give, and the snapshot it came from must not change (requests in flight
/// still read it).
#[test]
fn with_adds_and_replaces_one_rule() {
    let a = single("a", "d1", BenefitType::Requests, 5, TriggerUnit::Day);
    let e = ent("e", BenefitType::LlmTokens, 100, TriggerUnit::Never);
    let rs = set(vec![a.clone(), e.clone()]);
    let names = |it: &mut dyn Iterator<Item = &Rule>| -> Vec<String> {
        it.map(|r| r.benefit_id.clone()).collect()
    };

    // Add a rule for another device.
    let b = single("b", "d2", BenefitType::Requests, 7, TriggerUnit::Day);
    let rs2 = rs.with(b.clone()).unwrap();
    assert_eq!(rs2.len(), 3);
    assert_eq!(rs2.get("b"), Some(&b));
    assert_eq!(ids(&rs2, &dev("d2"), T0 + 1), ["b", "e"]);
    assert_eq!(rs.len(), 2, "the old snapshot is unchanged");
    assert!(rs.get("b").is_none());
    assert_eq!(ids(&rs, &dev("d2"), T0 + 1), ["e"]);

    // Replace (same benefit_id): a new limit.
    let mut a2 = a.clone();
    a2.limit = 50;
    let rs3 = rs2.with(a2.clone()).unwrap();
    assert_eq!(rs3.len(), 3);
    assert_eq!(rs3.get("a"), Some(&a2));
    assert_eq!(rs3.for_device(&dev("d1")).collect::<Vec<_>>(), [&a2]);
    assert_eq!(rs2.get("a"), Some(&a));

    // Replace with another entity_id: the rule leaves d1 and goes after d2's own rule.
    let mut a3 = a2.clone();
    a3.entity_id = "d2".into();
    a3.trigger_unit = TriggerUnit::Never;
    let rs4 = rs3.with(a3.clone()).unwrap();
    assert_eq!(rs4.len(), 3);
    assert_eq!(rs4.for_device(&dev("d1")).count(), 0);
    assert_eq!(ids(&rs4, &dev("d1"), T0 + 1), ["e"]);
    assert_eq!(names(&mut rs4.for_device(&dev("d2"))), ["b", "a"]);
    assert_eq!(ids(&rs4, &dev("d2"), T0 + 1), ["a", "b", "e"]);
    assert_eq!(names(&mut rs3.for_device(&dev("d1"))), ["a"]);

    // Replace with another entity type: the device rule becomes enterprise-wide, and back.
    let a4 = ent("a", BenefitType::Requests, 9, TriggerUnit::Never);
    let rs5 = rs4.with(a4.clone()).unwrap();
    assert_eq!(rs5.len(), 3);
    assert_eq!(names(&mut rs5.for_device(&dev("d2"))), ["b"]);
    assert_eq!(names(&mut rs5.enterprise_rules()), ["e", "a"]);
    assert_eq!(ids(&rs5, &dev("d1"), T0 + 1), ["a", "e"]);
    let rs6 = rs5.with(a.clone()).unwrap();
    assert_eq!(names(&mut rs6.enterprise_rules()), ["e"]);
    assert_eq!(ids(&rs6, &dev("d1"), T0 + 1), ["a", "e"]);
    assert_eq!(rs6.get("a"), Some(&a));

    // Rules that never apply to devices are stored and replaced too.
    let cc = rule(
        "cc",
        EntityType::SingleCustomConsumer,
        "u1",
        BenefitType::LlmTokens,
        1,
        TriggerUnit::Day,
        1,
    );
    let rs7 = rs6.with(cc.clone()).unwrap();
    assert_eq!(rs7.len(), 4);
    assert_eq!(rs7.get("cc"), Some(&cc));
    let mut cc2 = cc.clone();
    cc2.entity_id = "u2".into();
    let rs8 = rs7.with(cc2.clone()).unwrap();
    assert_eq!(rs8.len(), 4);
    assert_eq!(rs8.get("cc"), Some(&cc2));
    assert_eq!(rs8.iter().filter(|r| r.benefit_id == "cc").count(), 1);

    // Every snapshot holds exactly its rules, and rebuilds into the same set.
    let mut all: Vec<Rule> = rs8.iter().cloned().collect();
    all.sort_by(|x, y| x.benefit_id.cmp(&y.benefit_id));
    assert_eq!(all, [a.clone(), b.clone(), cc2, e.clone()]);
    let rebuilt = RuleSet::new(rs8.iter().cloned().collect()).unwrap();
    assert_eq!(names(&mut rebuilt.for_device(&dev("d2"))), ["b"]);
    let mut back = rs8.into_rules();
    back.sort_by(|x, y| x.benefit_id.cmp(&y.benefit_id));
    assert_eq!(back, all);
    assert_eq!(rs.iter().count(), 2);
}

/// `with` refuses exactly what `admits` refuses, with the same errors (flat field names), so
/// the admin API answers the same whichever it calls.
#[test]
fn with_refuses_what_admits_refuses() {
    // Device overlaps.
    let mut a = single("a", "d1", BenefitType::Requests, 1, TriggerUnit::Day);
    a.ended_at = T0 + 10 * DAY;
    let mut b = single("b", "d1", BenefitType::Requests, 1, TriggerUnit::Day);
    b.started_at = T0 + 10 * DAY;
    let rs = set(vec![a.clone(), b.clone()]);
    let mut c = b.clone();
    c.benefit_id = "c".into();
    c.started_at = T0 + 5 * DAY;
    let err = rs.with(c.clone()).unwrap_err();
    assert_eq!(err, rs.admits(&c).unwrap_err());
    assert_eq!(err.0.len(), 2, "{err}");
    assert_eq!(err.0[0].field, "started_at");
    assert!(matches!(
        &err.0[0].kind,
        RuleErrorKind::DeviceRuleOverlap { kind: "periodic", existing } if existing == "a"
    ));
    assert!(RuleSet::new(vec![a.clone(), b.clone(), c.clone()]).is_err());
    // Moving b into a's time overlaps a; b does not overlap its own old version.
    let mut b2 = b.clone();
    b2.started_at = T0 + 9 * DAY;
    let err = rs.with(b2.clone()).unwrap_err();
    assert_eq!(err, rs.admits(&b2).unwrap_err());
    assert!(matches!(
        &err.0[..],
        [RuleError { kind: RuleErrorKind::DeviceRuleOverlap { existing, .. }, .. }] if existing == "a"
    ));
    let mut b3 = b.clone();
    b3.ended_at = T0 + 20 * DAY;
    rs.with(b3).unwrap();
    // Another kind or benefit type, a cancelled rule or another device do not overlap.
    let mut other_kind = c.clone();
    other_kind.trigger_unit = TriggerUnit::Never;
    let mut cancelled = c.clone();
    cancelled.status = RuleStatus::Cancel;
    let mut elsewhere = c.clone();
    elsewhere.entity_id = "d2".into();
    for ok in [other_kind, cancelled, elsewhere.clone()] {
        rs.admits(&ok).unwrap();
        rs.with(ok).unwrap();
    }
    // A rule moved to another device is checked against that device's rules.
    let rs2 = rs.with(elsewhere.clone()).unwrap();
    let err = rs2.with(c.clone()).unwrap_err();
    assert_eq!(err, rs2.admits(&c).unwrap_err());

    // Enterprise-wide conflicts: one periodic rule per benefit type; replacing it is fine.
    let rs = set(vec![ent(
        "e1",
        BenefitType::LlmTokens,
        10,
        TriggerUnit::Day,
    )]);
    let e2 = ent("e2", BenefitType::LlmTokens, 10, TriggerUnit::Hour);
    let err = rs.with(e2.clone()).unwrap_err();
    assert_eq!(err, rs.admits(&e2).unwrap_err());
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].field, "trigger_unit");
    assert!(matches!(
        &err.0[0].kind,
        RuleErrorKind::EnterpriseRuleConflict { existing, .. } if existing == "e1"
    ));
    let mut e1b = ent("e1", BenefitType::LlmTokens, 10, TriggerUnit::Hour);
    e1b.status = RuleStatus::Frozen;
    let rs2 = rs.with(e1b).unwrap();
    assert!(rs2.with(e2.clone()).is_err(), "frozen still counts");
    let mut e1c = ent("e1", BenefitType::LlmTokens, 10, TriggerUnit::Day);
    e1c.status = RuleStatus::Cancel;
    rs.with(e1c).unwrap().with(e2.clone()).unwrap();
    // The custom-consumer scope is its own.
    let mut cc = e2.clone();
    cc.entity_type = EntityType::EnterpriseAllCustomConsumers;
    let rs3 = rs.with(cc.clone()).unwrap();
    cc.benefit_id = "cc2".into();
    assert_eq!(
        rs3.with(cc.clone()).unwrap_err(),
        rs3.admits(&cc).unwrap_err()
    );

    // Field validation, with the flat rule's field names.
    let mut bad = single("", "", BenefitType::Requests, 1, TriggerUnit::Day);
    bad.trigger_time = 0;
    let err = rs.with(bad.clone()).unwrap_err();
    assert_eq!(err, rs.admits(&bad).unwrap_err());
    let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["benefit_id", "entity_id", "trigger_time"]);
}

// ---------------------------------------------------------------- applicability and windows

#[test]
fn single_overrides_enterprise_per_benefit_and_kind() {
    let rs = set(vec![
        ent("e_tok_day", BenefitType::LlmTokens, 5000, TriggerUnit::Day),
        ent(
            "e_tok_all",
            BenefitType::LlmTokens,
            50_000,
            TriggerUnit::Never,
        ),
        ent("e_req_day", BenefitType::Requests, 100, TriggerUnit::Day),
        single(
            "s_tok_day",
            "d1",
            BenefitType::LlmTokens,
            2000,
            TriggerUnit::Day,
        ),
        rule(
            "cc",
            EntityType::SingleCustomConsumer,
            "d2",
            BenefitType::LlmTokens,
            1,
            TriggerUnit::Day,
            1,
        ),
    ]);
    let now = T0 + 100;
    // d1: its daily token rule replaces the enterprise daily one; the enterprise cumulative
    // token rule and the request rule still apply.
    assert_eq!(
        ids(&rs, &dev("d1"), now),
        ["e_req_day", "e_tok_all", "s_tok_day"]
    );
    // d2 only has a custom-consumer rule with the same id string: never applies to devices.
    assert_eq!(
        ids(&rs, &dev("d2"), now),
        ["e_req_day", "e_tok_all", "e_tok_day"]
    );
    assert_eq!(rs.for_device(&dev("d1")).count(), 1);
    assert_eq!(rs.enterprise_rules().count(), 3);
    assert_eq!(rs.get("s_tok_day").map(|r| r.limit), Some(2000));

    // Either exhausted blocks: d1's periodic cap of 2000 blocks before the enterprise 5000.
    let mut l = ledger();
    assert_eq!(
        l.charge("r1", &dev("d1"), &tokens(1500, 499), &rs, now),
        SettleOutcome::Settled
    );
    assert!(l.check(&rs, &dev("d1"), now).is_ok());
    l.charge("r2", &dev("d1"), &tokens(1, 0), &rs, now);
    let d = l.check(&rs, &dev("d1"), now).unwrap_err();
    assert_eq!(d.reason, DenyReason::QuotaExhausted);
    assert_eq!(d.message, "quota exhausted: llm_tokens");
    assert_eq!(d.retry_after_s, Some(DAY - 100));
    let e = l.check_detailed(&rs, &dev("d1"), now).unwrap_err();
    assert_eq!(e.benefit_id, "s_tok_day");
    // Another device has the enterprise default for itself (not a shared pool).
    assert!(l.check(&rs, &dev("d3"), now).is_ok());
    // Next day the periodic cap resets, the cumulative counter keeps counting.
    assert!(l.check(&rs, &dev("d1"), T0 + DAY).is_ok());
    assert_eq!(
        l.counter(&dev("d1"), BenefitType::LlmTokens, RuleKind::Cumulative)
            .unwrap()
            .used,
        2000
    );
    // The cumulative cap blocks with no Retry-After, and wins over a periodic denial.
    l.charge("r3", &dev("d1"), &tokens(48_000, 0), &rs, T0 + DAY);
    let d = l.check(&rs, &dev("d1"), T0 + DAY).unwrap_err();
    assert_eq!(d.retry_after_s, None);
    assert_eq!(
        l.check_detailed(&rs, &dev("d1"), T0 + DAY)
            .unwrap_err()
            .benefit_id,
        "e_tok_all"
    );
    // Devices with no rules are unlimited.
    assert!(l.check(&RuleSet::default(), &dev("d1"), T0).is_ok());
}

#[test]
fn inactive_rules_are_ignored_and_enterprise_default_returns() {
    let mut frozen = single(
        "s_frozen",
        "d1",
        BenefitType::Requests,
        0,
        TriggerUnit::Never,
    );
    frozen.status = RuleStatus::Frozen;
    let mut cancelled = single(
        "s_cancel",
        "d2",
        BenefitType::Requests,
        0,
        TriggerUnit::Never,
    );
    cancelled.status = RuleStatus::Cancel;
    let mut later = single(
        "s_later",
        "d3",
        BenefitType::Requests,
        0,
        TriggerUnit::Never,
    );
    later.started_at = T0 + 1000;
    let mut ended = single(
        "s_ended",
        "d4",
        BenefitType::Requests,
        0,
        TriggerUnit::Never,
    );
    ended.started_at = T0 - 1000;
    ended.ended_at = T0;
    let rs = set(vec![
        frozen,
        cancelled,
        later,
        ended,
        ent("e", BenefitType::Requests, 5, TriggerUnit::Never),
    ]);
    let l = ledger();
    for d in ["d1", "d2", "d3", "d4"] {
        assert_eq!(ids(&rs, &dev(d), T0), ["e"], "{d}");
        assert!(l.check(&rs, &dev(d), T0).is_ok());
    }
    // started_at inclusive, ended_at exclusive.
    assert_eq!(ids(&rs, &dev("d3"), T0 + 1000), ["s_later"]);
    assert!(l.check(&rs, &dev("d3"), T0 + 1000).is_err()); // limit 0 blocks
    assert_eq!(ids(&rs, &dev("d4"), T0 - 1), ["s_ended"]);
    assert_eq!(ids(&rs, &dev("d4"), T0 - 1001), Vec::<String>::new());
}

#[test]
fn windows_align_to_started_at() {
    let start = T0 + 16 * 3600; // 16:00 UTC = 00:00 Beijing
    for (unit, secs) in [
        (TriggerUnit::Minute, 60),
        (TriggerUnit::Hour, 3600),
        (TriggerUnit::Day, DAY),
    ] {
        for n in [1u32, 2, 7] {
            let mut r = single("r", "d", BenefitType::Requests, 1, unit);
            r.trigger_time = n;
            r.started_at = start;
            let p = secs * u64::from(n);
            assert_eq!(r.period_s(), Some(p));
            assert_eq!(
                r.window(start),
                Some(Window {
                    start,
                    end: start + p
                })
            );
            assert_eq!(r.window(start + p - 1).unwrap().start, start);
            assert_eq!(
                r.window(start + 3 * p + 5),
                Some(Window {
                    start: start + 3 * p,
                    end: start + 4 * p
                })
            );
            assert_eq!(r.resets_at(start + p), Some(start + 2 * p));
            assert_eq!(r.window(start - 1), None);
        }
    }
    // Cumulative: one window for the rule's life, no reset.
    let mut r = single("r", "d", BenefitType::Requests, 1, TriggerUnit::Never);
    r.ended_at = T0 + 500;
    assert_eq!(
        r.window(T0 + 10),
        Some(Window {
            start: T0,
            end: T0 + 500
        })
    );
    assert_eq!(r.resets_at(T0 + 10), None);
    assert_eq!(r.window(T0 + 500), None);
    // Periodic windows are cut at ended_at.
    let mut r = single("r", "d", BenefitType::Requests, 1, TriggerUnit::Day);
    r.ended_at = T0 + DAY + 600;
    assert_eq!(r.resets_at(T0 + DAY + 1), Some(T0 + DAY + 600));
}

#[test]
fn periodic_counter_resets_and_retry_after_is_exact() {
    let mut r = single("m", "d", BenefitType::Requests, 3, TriggerUnit::Minute);
    r.trigger_time = 5;
    let rs = set(vec![r]);
    let d = dev("d");
    let mut l = ledger();
    for i in 0..3 {
        l.charge(&format!("r{i}"), &d, &requests(1), &rs, T0 + 10);
    }
    let denial = l.check(&rs, &d, T0 + 10).unwrap_err();
    assert_eq!(denial.retry_after_s, Some(300 - 10));
    assert_eq!(
        l.check(&rs, &d, T0 + 299).unwrap_err().retry_after_s,
        Some(1)
    );
    assert!(l.check(&rs, &d, T0 + 300).is_ok());
    let u = l.usage(&rs, &d, T0 + 300);
    assert_eq!((u[0].used, u[0].window_start), (0, T0 + 300));
    // A charge in the new window starts from zero.
    l.charge("r9", &d, &requests(1), &rs, T0 + 301);
    assert_eq!(
        l.counter(&d, BenefitType::Requests, RuleKind::Periodic),
        Some(CounterView {
            window_start: T0 + 300,
            used: 1,
            reserved: 0
        })
    );
}

// ---------------------------------------------------------------- ledger lifecycle

#[test]
fn reserve_then_settle_more_or_less_than_estimate() {
    let rs = set(vec![
        single("tok", "d", BenefitType::LlmTokens, 1000, TriggerUnit::Day),
        single("req", "d", BenefitType::Requests, 100, TriggerUnit::Never),
    ]);
    let d = dev("d");
    let mut l = ledger();
    let res = l.reserve("a", &d, &tokens(300, 0), &rs, T0).unwrap();
    assert_eq!(res.expires_at_s(), T0 + 900);
    assert_eq!(
        used(&l, &d, BenefitType::LlmTokens, RuleKind::Periodic),
        (0, 300)
    );
    assert_eq!(
        used(&l, &d, BenefitType::Requests, RuleKind::Cumulative),
        (0, 1)
    );
    let u = l.usage(&rs, &d, T0);
    let tok = u.iter().find(|i| i.benefit_id == "tok").unwrap();
    assert_eq!((tok.used, tok.reserved, tok.remaining), (0, 300, 700));
    assert_eq!(tok.resets_at, Some(T0 + DAY));
    assert_eq!(tok.unit, BaseUnit::Tokens);

    // Less than estimated.
    assert_eq!(
        l.settle("a", &tokens(100, 20), T0 + 5),
        SettleOutcome::Settled
    );
    assert_eq!(
        used(&l, &d, BenefitType::LlmTokens, RuleKind::Periodic),
        (120, 0)
    );
    // More than estimated.
    let _r = l.reserve("b", &d, &tokens(10, 0), &rs, T0 + 6).unwrap();
    assert_eq!(
        l.settle("b", &tokens(500, 400), T0 + 7),
        SettleOutcome::Settled
    );
    assert_eq!(
        used(&l, &d, BenefitType::LlmTokens, RuleKind::Periodic),
        (1020, 0)
    );
    assert_eq!(
        used(&l, &d, BenefitType::Requests, RuleKind::Cumulative),
        (2, 0)
    );
    // Over the limit now (bounded overshoot): denied, and remaining floors at 0.
    assert!(matches!(
        l.reserve("c", &d, &tokens(1, 0), &rs, T0 + 8),
        Err(ReserveError::Denied(_))
    ));
    assert_eq!(l.open_reservations(), 0);
    let tok = l
        .usage(&rs, &d, T0 + 8)
        .into_iter()
        .find(|i| i.benefit_id == "tok")
        .unwrap();
    assert_eq!(tok.remaining, 0);
}

/// A rule full only of in-progress holds refuses with `Retry-After: 1` (the holds settle
/// soon), not with the window reset; a rule really used up still answers with the reset, and
/// wins over a held one.
#[test]
fn a_rule_full_of_holds_says_retry_shortly() {
    let rs = set(vec![single(
        "tok",
        "d",
        BenefitType::LlmTokens,
        1500,
        TriggerUnit::Day,
    )]);
    let d = dev("d");
    let mut l = ledger();
    let _ = l.reserve("a", &d, &tokens(1000, 0), &rs, T0).unwrap();
    let _ = l.reserve("b", &d, &tokens(1000, 0), &rs, T0).unwrap();
    let e = l.check_detailed(&rs, &d, T0 + 1).unwrap_err();
    assert!(e.held);
    let denial = e.to_denial();
    assert_eq!(denial.retry_after_s, Some(HELD_RETRY_AFTER_S));
    assert_eq!(denial.reason, DenyReason::QuotaExhausted);
    l.settle("a", &tokens(20, 6), T0 + 2);
    l.settle("b", &tokens(20, 6), T0 + 2);
    assert!(
        l.check(&rs, &d, T0 + 2).is_ok(),
        "room again once the holds settled"
    );

    l.charge("c", &d, &tokens(1500, 0), &rs, T0 + 3);
    let e = l.check_detailed(&rs, &d, T0 + 3).unwrap_err();
    assert!(!e.held);
    assert_eq!(e.retry_after_s, Some(DAY - 3));

    // Two rules, one used up and one only held: the used-up one is the answer.
    let rs = set(vec![
        single("req", "d2", BenefitType::Requests, 1, TriggerUnit::Hour),
        single("tok2", "d2", BenefitType::LlmTokens, 1000, TriggerUnit::Day),
    ]);
    let d2 = dev("d2");
    let _ = l.reserve("y", &d2, &tokens(0, 0), &rs, T0).unwrap(); // fills `req` with a hold
    let e = l.check_detailed(&rs, &d2, T0).unwrap_err();
    assert_eq!((e.benefit_id.as_str(), e.held), ("req", true));
    let mut used_up = tokens(1000, 0);
    used_up.requests = 0;
    l.charge("x", &d2, &used_up, &rs, T0);
    let e = l.check_detailed(&rs, &d2, T0).unwrap_err();
    assert_eq!((e.benefit_id.as_str(), e.held), ("tok2", false));
    assert_eq!(e.retry_after_s, Some(DAY));
}

#[test]
fn settle_refund_and_charge_are_idempotent() {
    let rs = set(vec![single(
        "tok",
        "d",
        BenefitType::LlmTokens,
        1000,
        TriggerUnit::Never,
    )]);
    let d = dev("d");
    let mut l = ledger();
    let _a = l.reserve("a", &d, &tokens(50, 0), &rs, T0).unwrap();
    // Reserving the same id again holds nothing more; another device may not reuse it.
    let _a2 = l.reserve("a", &d, &tokens(50, 0), &rs, T0).unwrap();
    assert_eq!(
        used(&l, &d, BenefitType::LlmTokens, RuleKind::Cumulative),
        (0, 50)
    );
    assert_eq!(
        l.reserve("a", &dev("other"), &tokens(1, 0), &rs, T0),
        Err(ReserveError::RequestIdReused)
    );
    assert_eq!(l.settle("a", &tokens(10, 0), T0), SettleOutcome::Settled);
    assert_eq!(
        l.settle("a", &tokens(999, 0), T0),
        SettleOutcome::AlreadySettled(Finish::Settled)
    );
    assert_eq!(
        l.refund("a", T0),
        RefundOutcome::AlreadySettled(Finish::Settled)
    );
    assert_eq!(
        l.reserve("a", &d, &tokens(1, 0), &rs, T0),
        Err(ReserveError::RequestIdReused)
    );
    assert_eq!(
        used(&l, &d, BenefitType::LlmTokens, RuleKind::Cumulative),
        (10, 0)
    );

    let _b = l.reserve("b", &d, &tokens(70, 0), &rs, T0).unwrap();
    assert_eq!(l.refund("b", T0), RefundOutcome::Refunded);
    assert_eq!(
        l.refund("b", T0),
        RefundOutcome::AlreadySettled(Finish::Refunded)
    );
    assert_eq!(
        l.settle("b", &tokens(5, 0), T0),
        SettleOutcome::AlreadySettled(Finish::Refunded)
    );
    assert_eq!(
        used(&l, &d, BenefitType::LlmTokens, RuleKind::Cumulative),
        (10, 0)
    );

    // Unknown ids: settle and refund do nothing; charge charges once.
    assert_eq!(l.settle("zzz", &tokens(5, 0), T0), SettleOutcome::Unknown);
    assert_eq!(l.refund("zzz", T0), RefundOutcome::Unknown);
    assert_eq!(
        l.charge("c", &d, &tokens(5, 0), &rs, T0),
        SettleOutcome::Settled
    );
    assert_eq!(
        l.charge("c", &d, &tokens(5, 0), &rs, T0),
        SettleOutcome::AlreadySettled(Finish::Charged)
    );
    // charge of an open reservation settles it.
    let _e = l.reserve("e", &d, &tokens(100, 0), &rs, T0).unwrap();
    assert_eq!(
        l.charge("e", &d, &tokens(1, 0), &rs, T0),
        SettleOutcome::Settled
    );
    assert_eq!(
        used(&l, &d, BenefitType::LlmTokens, RuleKind::Cumulative),
        (16, 0)
    );
}

#[test]
fn idempotency_memory_is_bounded() {
    let rs = set(vec![single(
        "req",
        "d",
        BenefitType::Requests,
        1_000_000,
        TriggerUnit::Never,
    )]);
    let d = dev("d");
    let mut l = QuotaLedger::new(LedgerPolicy {
        remember_finished_s: 60,
        remember_finished_max: 3,
        ..LedgerPolicy::default()
    });
    for i in 0..5 {
        l.charge(&format!("r{i}"), &d, &requests(1), &rs, T0);
    }
    assert_eq!(l.remembered_ids(), 3);
    // r0 and r1 were forgotten (count bound): a repeat is charged again.
    assert_eq!(
        l.charge("r0", &d, &requests(1), &rs, T0),
        SettleOutcome::Settled
    );
    assert_eq!(
        l.charge("r4", &d, &requests(1), &rs, T0),
        SettleOutcome::AlreadySettled(Finish::Charged)
    );
    // Time bound.
    assert!(l.sweep(T0 + 60).is_empty());
    assert_eq!(l.remembered_ids(), 0);
}

#[test]
fn sweep_charges_expired_reservations_their_estimate() {
    let rs = set(vec![
        single("tok", "d", BenefitType::LlmTokens, 1000, TriggerUnit::Never),
        single(
            "vs",
            "d",
            BenefitType::VoiceSessionMs,
            10_000,
            TriggerUnit::Never,
        ),
    ]);
    let d = dev("d");
    let mut l = QuotaLedger::new(LedgerPolicy {
        reservation_ttl_s: 60,
        ..LedgerPolicy::default()
    });
    let _a = l.reserve("a", &d, &tokens(200, 0), &rs, T0).unwrap();
    let _b = l.reserve("b", &d, &tokens(30, 0), &rs, T0 + 30).unwrap();
    assert!(l.sweep(T0 + 59).is_empty());
    let swept = l.sweep(T0 + 60);
    assert_eq!(swept.len(), 1);
    assert_eq!(swept[0].request_id, "a");
    assert_eq!(swept[0].charged, tokens(200, 0));
    assert_eq!(
        used(&l, &d, BenefitType::LlmTokens, RuleKind::Cumulative),
        (200, 30)
    );
    assert_eq!(
        l.settle("a", &tokens(1, 0), T0 + 61),
        SettleOutcome::AlreadySettled(Finish::Swept)
    );

    // progress extends the expiry and grows the hold; a sweep charges the larger amount.
    let so_far = Consumption {
        voice_session_ms: 4_000,
        ..tokens(50, 0)
    };
    assert_eq!(l.progress("b", &so_far, &rs, T0 + 80), Progress::Continue);
    assert!(l.sweep(T0 + 100).is_empty());
    assert_eq!(
        used(&l, &d, BenefitType::VoiceSessionMs, RuleKind::Cumulative),
        (0, 4_000)
    );
    let swept = l.sweep(T0 + 140);
    assert_eq!(swept.len(), 1);
    assert_eq!(
        used(&l, &d, BenefitType::LlmTokens, RuleKind::Cumulative),
        (250, 0)
    );
    assert_eq!(
        used(&l, &d, BenefitType::VoiceSessionMs, RuleKind::Cumulative),
        (4_000, 0)
    );
    assert_eq!(l.progress("b", &so_far, &rs, T0 + 141), Progress::Unknown);
}

#[test]
fn progress_stops_a_session_that_runs_out() {
    let rs = set(vec![single(
        "voice",
        "d",
        BenefitType::VoiceUnifiedDurationSystem,
        60, // seconds
        TriggerUnit::Hour,
    )]);
    let d = dev("d");
    let mut l = ledger();
    l.charge(
        "old",
        &d,
        &Consumption {
            voice_session_ms: 20_000,
            ..Consumption::default()
        },
        &rs,
        T0,
    );
    // A big estimate does not count against the session itself.
    let est = Consumption {
        voice_session_ms: 50_000,
        ..Consumption::default()
    };
    let _s = l.reserve("s", &d, &est, &rs, T0 + 1).unwrap();
    let at = |ms| Consumption {
        voice_session_ms: ms,
        ..Consumption::default()
    };
    assert_eq!(
        l.progress("s", &at(39_999), &rs, T0 + 41),
        Progress::Continue
    );
    // Meanwhile others are denied: 20 s used + 50 s held ≥ 60 s.
    assert!(l.check(&rs, &d, T0 + 41).is_err());
    match l.progress("s", &at(40_000), &rs, T0 + 42) {
        Progress::Exhausted(denial) => {
            assert_eq!(
                denial.message,
                "quota exhausted: voice_unified_duration_system"
            );
            assert_eq!(denial.retry_after_s, Some(3600 - 42));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(l.settle("s", &at(40_500), T0 + 43), SettleOutcome::Settled);
    assert_eq!(
        used(
            &l,
            &d,
            BenefitType::VoiceUnifiedDurationSystem,
            RuleKind::Periodic
        ),
        (60_500, 0)
    );
}

#[test]
fn settlement_lands_in_the_window_of_settle_time() {
    let rs = set(vec![single(
        "tok",
        "d",
        BenefitType::LlmTokens,
        1000,
        TriggerUnit::Day,
    )]);
    let d = dev("d");
    let mut l = ledger();
    l.charge("x", &d, &tokens(900, 0), &rs, T0 + DAY - 10);
    let _r = l
        .reserve("a", &d, &tokens(50, 0), &rs, T0 + DAY - 5)
        .unwrap();
    l.settle("a", &tokens(70, 0), T0 + DAY + 5);
    assert_eq!(
        l.counter(&d, BenefitType::LlmTokens, RuleKind::Periodic),
        Some(CounterView {
            window_start: T0 + DAY,
            used: 70,
            reserved: 0
        })
    );
}

// ---------------------------------------------------------------- amounts

#[test]
fn price_table_is_exact() {
    let prices = PriceTable {
        llm_input_per_1k_tokens: 2_500_000, // 2.5 points / 1k tokens
        ..PriceTable::default()
    };
    assert_eq!(prices.micro_points(&tokens(1_234, 0)), 3_085_000);
    let prices = PriceTable {
        per_request: 10_000,
        llm_input_per_1k_tokens: 2_500_000,
        llm_output_per_1k_tokens: 7_000_000,
        audio_in_per_second: 1_000, // 0.001 points / s
        audio_out_per_second: 3_000,
        tts_per_1k_chars: 500_000,
        voice_session_per_second: 0,
    };
    let c = Consumption {
        usage: Usage {
            llm_input_tokens: 1_234,
            llm_output_tokens: 100,
            audio_in_ms: 1_500,
            audio_out_ms: 2_001,
            tts_chars: 3,
            ..Usage::default()
        },
        requests: 1,
        voice_session_ms: 9_999,
    };
    // 10_000 + 3_085_000 + 700_000 + 1_500 + 6_003 + 1_500 = 3_804_003
    assert_eq!(prices.micro_points(&c), 3_804_003);
    assert_eq!(c.amount(BenefitType::ResourcePoint, &prices), 3_804_003);
    // Fractions round up once per settlement: 1 token at 2.5 points/1k = 2_500 µp; 1 token at
    // 1 µp/1k = 0.001 µp → 1.
    assert_eq!(prices.micro_points(&tokens(1, 0)), 10_000 + 2_500);
    let tiny = PriceTable {
        llm_input_per_1k_tokens: 1,
        ..PriceTable::default()
    };
    assert_eq!(tiny.micro_points(&tokens(1, 0)), 1);
    assert_eq!(tiny.micro_points(&tokens(1000, 0)), 1);
    assert_eq!(tiny.micro_points(&tokens(1001, 0)), 2);
    // Saturates instead of overflowing.
    let huge = PriceTable {
        per_request: u64::MAX,
        llm_input_per_1k_tokens: u64::MAX,
        ..PriceTable::default()
    };
    assert_eq!(huge.micro_points(&tokens(u64::MAX, 0)), u64::MAX);

    // Other benefits.
    assert_eq!(c.amount(BenefitType::Requests, &prices), 1);
    assert_eq!(c.amount(BenefitType::LlmTokens, &prices), 1_334);
    assert_eq!(c.amount(BenefitType::AudioInMs, &prices), 1_500);
    assert_eq!(c.amount(BenefitType::AudioOutMs, &prices), 2_001);
    assert_eq!(c.amount(BenefitType::TtsChars, &prices), 3);
    assert_eq!(c.amount(BenefitType::VoiceSessionMs, &prices), 9_999);
    assert_eq!(
        c.amount(BenefitType::VoiceUnifiedDurationCustom, &prices),
        9_999
    );
}

#[test]
fn resource_point_limits_are_in_points() {
    let rs = set(vec![single(
        "rp",
        "d",
        BenefitType::ResourcePoint,
        3,
        TriggerUnit::Never,
    )]);
    let d = dev("d");
    let mut l = QuotaLedger::new(LedgerPolicy {
        prices: PriceTable {
            llm_input_per_1k_tokens: 2_500_000,
            ..PriceTable::default()
        },
        ..LedgerPolicy::default()
    });
    l.charge("a", &d, &tokens(1_199, 0), &rs, T0); // 2.9975 points
    assert!(l.check(&rs, &d, T0).is_ok());
    let u = &l.usage(&rs, &d, T0)[0];
    assert_eq!(
        (u.unit, u.rule_limit, u.limit, u.used, u.remaining),
        (BaseUnit::MicroPoints, 3, 3_000_000, 2_997_500, 2_500)
    );
    l.charge("b", &d, &tokens(1, 0), &rs, T0); // exactly 3 points
    assert!(l.check(&rs, &d, T0).is_err());
}

// ---------------------------------------------------------------- persistence

/// A failed write puts the counters back without rolling back what was charged since.
#[test]
fn requeue_after_a_failed_write_keeps_newer_charges() {
    let rs = set(vec![ent(
        "tok",
        BenefitType::LlmTokens,
        1000,
        TriggerUnit::Never,
    )]);
    let mut l = ledger();
    l.charge("a", &dev("d1"), &tokens(5, 0), &rs, T0);
    let failed = l.drain_dirty();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].used, 5);
    // Charged between the drain and the failed write.
    l.charge("b", &dev("d1"), &tokens(3, 0), &rs, T0 + 1);
    let _ = l.drain_dirty(); // the persister may drain again before the failure is handled
    l.requeue(&failed);
    let retry = l.drain_dirty();
    assert_eq!(retry.len(), 1, "requeued");
    assert_eq!(retry[0].used, 8, "current value, not the failed snapshot");
    assert!(l.drain_dirty().is_empty());
    assert_eq!(l.usage(&rs, &dev("d1"), T0 + 2)[0].used, 8);
}

#[test]
fn export_import_and_drain_dirty() {
    let rs = set(vec![
        ent("req", BenefitType::Requests, 100, TriggerUnit::Day),
        ent("tok", BenefitType::LlmTokens, 1000, TriggerUnit::Never),
    ]);
    let mut l = ledger();
    let _r = l.reserve("a", &dev("d1"), &tokens(5, 0), &rs, T0).unwrap();
    assert!(
        l.drain_dirty().is_empty(),
        "reservations alone do not persist"
    );
    l.settle("a", &tokens(7, 0), T0 + 1);
    l.charge("b", &dev("d2"), &requests(1), &rs, T0 + 2);
    let mut dirty = l.drain_dirty();
    dirty.sort_by(|a, b| (&a.device, a.benefit_type).cmp(&(&b.device, b.benefit_type)));
    assert_eq!(dirty.len(), 4);
    assert_eq!(
        dirty[1],
        CounterRecord {
            device: dev("d1"),
            benefit_type: BenefitType::LlmTokens,
            kind: RuleKind::Cumulative,
            window_start: T0,
            used: 7,
            granted: 0,
            acked: 0,
        }
    );
    assert!(l.drain_dirty().is_empty());
    l.charge("c", &dev("d2"), &requests(1), &rs, T0 + 3);
    assert_eq!(l.drain_dirty().len(), 2);

    let json = serde_json::to_string(&l.export()).unwrap();
    let records: Vec<CounterRecord> = serde_json::from_str(&json).unwrap();
    let mut l2 = ledger();
    l2.import(records);
    assert!(l2.drain_dirty().is_empty());
    let mut a = l.export();
    let mut b = l2.export();
    a.sort_by(|x, y| (&x.device, x.benefit_type).cmp(&(&y.device, y.benefit_type)));
    b.sort_by(|x, y| (&x.device, x.benefit_type).cmp(&(&y.device, y.benefit_type)));
    assert_eq!(a, b);
    assert_eq!(
        l2.usage(&rs, &dev("d2"), T0 + 4)
            .iter()
            .find(|i| i.benefit_id == "req")
            .map(|i| i.used),
        Some(2)
    );
}

/// Devices without an applicable rule cost the ledger no counter: a fleet where most devices
/// have no rule keeps the counter map at the size of the ones that do.
#[test]
fn devices_without_an_applicable_rule_get_no_counter() {
    let rs = set(vec![single(
        "tok",
        "ruled",
        BenefitType::LlmTokens,
        1000,
        TriggerUnit::Day,
    )]);
    let mut l = ledger();
    let free = dev("free");
    let _r = l.reserve("a", &free, &tokens(5, 0), &rs, T0).unwrap();
    assert_eq!(l.settle("a", &tokens(7, 0), T0 + 1), SettleOutcome::Settled);
    let _r = l.reserve("b", &free, &tokens(5, 0), &rs, T0).unwrap();
    assert_eq!(l.refund("b", T0 + 1), RefundOutcome::Refunded);
    assert_eq!(
        l.charge("c", &free, &tokens(5, 0), &rs, T0),
        SettleOutcome::Settled
    );
    assert!(l.export().is_empty());
    assert!(l.drain_dirty().is_empty());
    // The ruled device next to it is counted as before.
    l.charge("d", &dev("ruled"), &tokens(5, 0), &rs, T0);
    assert_eq!(l.export().len(), 1);
    assert_eq!(l.drain_dirty().len(), 1);
}

// ---------------------------------------------------------------- leased mode (cluster)

fn record_of(l: &QuotaLedger, d: &DeviceId, b: BenefitType, k: RuleKind) -> Option<CounterRecord> {
    l.export()
        .into_iter()
        .find(|r| &r.device == d && r.benefit_type == b && r.kind == k)
}

#[test]
fn leased_mode_admits_only_against_the_lease() {
    let rs = set(vec![ent(
        "req",
        BenefitType::Requests,
        100,
        TriggerUnit::Day,
    )]);
    let d = dev("d");
    let mut l = ledger();
    assert!(!l.leased());
    l.set_leased(true);
    assert!(l.leased());

    // No lease yet: denied although the rule allows 100; the denial is the rule's.
    match l.reserve("r0", &d, &requests(1), &rs, T0 + 10) {
        Err(ReserveError::Denied(denial)) => {
            assert_eq!(denial.reason, DenyReason::QuotaExhausted);
            assert_eq!(denial.retry_after_s, Some(DAY - 10));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        l.check_detailed(&rs, &d, T0 + 10).unwrap_err().benefit_id,
        "req"
    );
    assert_eq!(
        l.wants(&rs, &d, T0 + 10, 5),
        vec![LeaseWant {
            benefit_type: BenefitType::Requests,
            kind: RuleKind::Periodic,
            window_start: T0,
            window_end: T0 + DAY,
            limit: 100,
            used: 0,
            granted: 0,
            acked: 0,
            want: 5,
        }]
    );
    assert_eq!(l.wants(&rs, &d, T0 + 10, 0)[0].want, 1, "at least 1");

    l.grant(
        &d,
        BenefitType::Requests,
        RuleKind::Periodic,
        T0,
        3,
        T0 + 11,
    );
    assert!(l.wants(&rs, &d, T0 + 11, 5).is_empty(), "lease has room");
    for i in 1..=3 {
        let _r = l
            .reserve(&format!("r{i}"), &d, &requests(1), &rs, T0 + 12)
            .unwrap();
    }
    assert!(matches!(
        l.reserve("r4", &d, &requests(1), &rs, T0 + 12),
        Err(ReserveError::Denied(_))
    ));
    // Holds count as demand.
    let w = l.wants(&rs, &d, T0 + 12, 5);
    assert_eq!((w[0].used, w[0].granted, w[0].want), (0, 3, 5));

    for i in 1..=3 {
        assert_eq!(
            l.settle(&format!("r{i}"), &requests(1), T0 + 13),
            SettleOutcome::Settled
        );
    }
    assert!(l.check(&rs, &d, T0 + 13).is_err());
    let w = l.wants(&rs, &d, T0 + 13, 5);
    assert_eq!((w[0].used, w[0].granted, w[0].want), (3, 3, 5));
    // Charges are dirty and carry the lease; a grant alone is not dirty.
    let dirty = l.drain_dirty();
    assert_eq!(dirty.len(), 1);
    assert_eq!((dirty[0].used, dirty[0].granted), (3, 3));
    l.grant(
        &d,
        BenefitType::Requests,
        RuleKind::Periodic,
        T0,
        5,
        T0 + 14,
    );
    assert!(l.drain_dirty().is_empty());
    assert!(l.check(&rs, &d, T0 + 14).is_ok());
    // usage() is unchanged: local values against the rule's limit.
    let u = &l.usage(&rs, &d, T0 + 14)[0];
    assert_eq!((u.limit, u.used, u.reserved, u.remaining), (100, 3, 0, 97));
}

#[test]
fn grants_do_not_change_non_leased_admission() {
    let rs = set(vec![ent("req", BenefitType::Requests, 2, TriggerUnit::Day)]);
    let d = dev("d");
    let mut l = ledger();
    // A lease smaller than the limit does not restrict...
    l.grant(&d, BenefitType::Requests, RuleKind::Periodic, T0, 1, T0);
    let _a = l.reserve("a", &d, &requests(1), &rs, T0 + 1).unwrap();
    let _b = l.reserve("b", &d, &requests(1), &rs, T0 + 1).unwrap();
    // ...and a larger one does not extend: the limit governs.
    l.grant(
        &d,
        BenefitType::Requests,
        RuleKind::Periodic,
        T0,
        100,
        T0 + 1,
    );
    assert!(matches!(
        l.reserve("c", &d, &requests(1), &rs, T0 + 1),
        Err(ReserveError::Denied(_))
    ));
    // A device without any grant is admitted as usual.
    assert!(l.check(&rs, &dev("other"), T0 + 1).is_ok());
    // Switching leased mode on: the lease (101) governs now.
    l.set_leased(true);
    assert!(l.check(&rs, &d, T0 + 1).is_ok());
    assert!(l.check(&rs, &dev("other"), T0 + 1).is_err());
}

#[test]
fn lease_rolls_over_with_the_window() {
    let rs = set(vec![single(
        "req",
        "d",
        BenefitType::Requests,
        100,
        TriggerUnit::Day,
    )]);
    let d = dev("d");
    let (b, k) = (BenefitType::Requests, RuleKind::Periodic);
    let mut l = ledger();
    l.set_leased(true);
    // Window A = [T0, T0 + DAY).
    l.grant(&d, b, k, T0, 10, T0 + 1);
    assert_eq!(
        l.charge("a", &d, &requests(1), &rs, T0 + 2),
        SettleOutcome::Settled
    );
    assert!(l.check(&rs, &d, T0 + 3).is_ok());

    // Window B: A's lease does not carry over.
    let wb = T0 + DAY;
    assert!(l.check(&rs, &d, wb + 5).is_err());
    assert_eq!(
        l.wants(&rs, &d, wb + 5, 4),
        vec![LeaseWant {
            benefit_type: b,
            kind: k,
            window_start: wb,
            window_end: wb + DAY,
            limit: 100,
            used: 0,
            granted: 0,
            acked: 0,
            want: 4,
        }]
    );
    // The grant for B moves the counter: used and granted start from 0.
    l.grant(&d, b, k, wb, 4, wb + 6);
    let r = record_of(&l, &d, b, k).unwrap();
    assert_eq!((r.window_start, r.used, r.granted), (wb, 0, 4));
    assert!(l.check(&rs, &d, wb + 6).is_ok());
    // A late grant for A is stale: ignored.
    l.grant(&d, b, k, T0, 50, wb + 7);
    let r = record_of(&l, &d, b, k).unwrap();
    assert_eq!((r.window_start, r.used, r.granted), (wb, 0, 4));
    for i in 0..4 {
        l.charge(&format!("b{i}"), &d, &requests(1), &rs, wb + 8);
    }
    assert!(l.check(&rs, &d, wb + 8).is_err());

    // A charge into window C moves the counter too: B's lease is gone.
    let wc = wb + DAY;
    l.charge("c", &d, &requests(1), &rs, wc + 1);
    let r = record_of(&l, &d, b, k).unwrap();
    assert_eq!((r.window_start, r.used, r.granted), (wc, 1, 0));
    assert!(l.check(&rs, &d, wc + 1).is_err());
}

#[test]
fn release_idle_gives_back_unused_lease() {
    let rs = set(vec![ent(
        "tok",
        BenefitType::LlmTokens,
        1000,
        TriggerUnit::Never,
    )]);
    let d = dev("d");
    let (b, k) = (BenefitType::LlmTokens, RuleKind::Cumulative);
    let mut l = ledger();
    l.set_leased(true);
    l.grant(&d, b, k, T0, 100, T0);
    let _r = l.reserve("a", &d, &tokens(30, 0), &rs, T0 + 1).unwrap();
    // An open reservation keeps the lease however long it is idle.
    assert_eq!(l.release_idle(T0 + 10_000, 60), 0);
    assert_eq!(
        l.settle("a", &tokens(20, 0), T0 + 10),
        SettleOutcome::Settled
    );
    let _ = l.drain_dirty();
    assert_eq!(l.release_idle(T0 + 69, 60), 0, "active at T0 + 10");
    // Activity refreshes the idle clock.
    l.charge("b", &d, &tokens(5, 0), &rs, T0 + 50);
    let _ = l.drain_dirty();
    assert_eq!(l.release_idle(T0 + 70, 60), 0, "active at T0 + 50");
    assert_eq!(l.release_idle(T0 + 110, 60), 1);
    assert_eq!(
        l.drain_dirty(),
        vec![CounterRecord {
            device: d.clone(),
            benefit_type: b,
            kind: k,
            window_start: T0,
            used: 25,
            granted: 25,
            acked: 100,
        }]
    );
    // Nothing left to give back; the node now holds no room.
    assert_eq!(l.release_idle(T0 + 10_000, 60), 0);
    assert!(l.drain_dirty().is_empty());
    assert!(l.check(&rs, &d, T0 + 111).is_err());
    // A grant is activity too.
    l.grant(&d, b, k, T0, 10, T0 + 200);
    assert_eq!(l.release_idle(T0 + 259, 60), 0);
    assert_eq!(l.release_idle(T0 + 260, 60), 1);
    assert_eq!(l.drain_dirty()[0].granted, 25);
}

#[test]
fn leased_progress_tops_up_and_continues() {
    let rs = set(vec![single(
        "voice",
        "d",
        BenefitType::VoiceUnifiedDurationSystem,
        60, // seconds: far above the lease
        TriggerUnit::Hour,
    )]);
    let d = dev("d");
    let (b, k) = (BenefitType::VoiceUnifiedDurationSystem, RuleKind::Periodic);
    let at = |ms| Consumption {
        voice_session_ms: ms,
        ..Consumption::default()
    };
    let mut l = ledger();
    l.set_leased(true);
    l.grant(&d, b, k, T0, 10_000, T0);
    let _s = l.reserve("s", &d, &at(5_000), &rs, T0 + 1).unwrap();
    assert_eq!(
        l.progress("s", &at(9_999), &rs, T0 + 11),
        Progress::Continue
    );
    // The session's own consumption reaches the lease.
    match l.progress("s", &at(10_000), &rs, T0 + 12) {
        Progress::Exhausted(denial) => assert_eq!(denial.retry_after_s, Some(3600 - 12)),
        other => panic!("{other:?}"),
    }
    // The grown hold is in `reserved`: wants covers it plus the lease size.
    let w = l.wants(&rs, &d, T0 + 12, 5_000);
    assert_eq!(w.len(), 1);
    assert_eq!((w[0].used, w[0].granted, w[0].want), (0, 10_000, 5_000));
    l.grant(
        &d,
        w[0].benefit_type,
        w[0].kind,
        w[0].window_start,
        w[0].want,
        T0 + 12,
    );
    assert_eq!(
        l.progress("s", &at(10_000), &rs, T0 + 12),
        Progress::Continue
    );
    assert_eq!(
        l.progress("s", &at(14_999), &rs, T0 + 13),
        Progress::Continue
    );
    assert!(matches!(
        l.progress("s", &at(15_000), &rs, T0 + 14),
        Progress::Exhausted(_)
    ));
}

#[test]
fn counter_record_without_granted_deserializes() {
    let old = r#"{"device":"d1","benefit_type":"llm_tokens","kind":"cumulative",
        "window_start":1741737600,"used":7}"#;
    let r: CounterRecord = serde_json::from_str(old).unwrap();
    assert_eq!(
        r,
        CounterRecord {
            device: dev("d1"),
            benefit_type: BenefitType::LlmTokens,
            kind: RuleKind::Cumulative,
            window_start: T0,
            used: 7,
            granted: 0,
            acked: 0,
        }
    );
    // The new shape carries it, and import restores it.
    let with = CounterRecord { granted: 9, ..r };
    assert_eq!(serde_json::to_value(&with).unwrap()["granted"], 9);
    let mut l = ledger();
    l.import(vec![with.clone()]);
    assert_eq!(l.export(), vec![with]);
    let rs = set(vec![ent(
        "tok",
        BenefitType::LlmTokens,
        1000,
        TriggerUnit::Never,
    )]);
    l.set_leased(true);
    let _a = l.reserve("a", &dev("d1"), &tokens(1, 0), &rs, T0).unwrap();
    assert!(l.check(&rs, &dev("d1"), T0).is_ok(), "7 used + 1 held < 9");
    let _b = l.reserve("b", &dev("d1"), &tokens(1, 0), &rs, T0).unwrap();
    assert!(l.check(&rs, &dev("d1"), T0).is_err(), "7 + 2 ≥ 9");
}

// ---------------------------------------------------------------- scale

#[test]
fn a_million_device_rules_look_up_in_constant_time() {
    const N: usize = 1_000_000;
    let mut rules = Vec::with_capacity(N + 2);
    for i in 0..N {
        rules.push(single(
            &format!("b{i}"),
            &format!("SN{i:07}"),
            BenefitType::LlmTokens,
            i as u64,
            TriggerUnit::Day,
        ));
    }
    rules.push(ent("e_day", BenefitType::LlmTokens, 5000, TriggerUnit::Day));
    rules.push(ent("e_req", BenefitType::Requests, 50, TriggerUnit::Never));
    let rs = RuleSet::new(rules).unwrap();
    assert_eq!(rs.len(), N + 2);
    let l = ledger();
    for i in (0..N).step_by(997) {
        let d = dev(&format!("SN{i:07}"));
        let got: Vec<&Rule> = rs.applicable(&d, T0 + 1).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].benefit_id, format!("b{i}"));
        assert_eq!(got[1].benefit_id, "e_req");
        assert_eq!(l.check(&rs, &d, T0 + 1).is_err(), i == 0);
    }
    assert_eq!(ids(&rs, &dev("unknown"), T0 + 1), ["e_day", "e_req"]);
}

// ---------------------------------------------------------------- properties

#[derive(Debug, Clone)]
enum Op {
    Reserve { id: u8, dev: u8, est: u64 },
    Settle { id: u8, actual: u64 },
    Refund { id: u8 },
    Progress { id: u8, so_far: u64 },
    Sweep,
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..12, 0u8..3, 0u64..500).prop_map(|(id, dev, est)| Op::Reserve { id, dev, est }),
        (0u8..12, 0u64..500).prop_map(|(id, actual)| Op::Settle { id, actual }),
        (0u8..12).prop_map(|id| Op::Refund { id }),
        (0u8..12, 0u64..800).prop_map(|(id, so_far)| Op::Progress { id, so_far }),
        Just(Op::Sweep),
        (0u64..40).prop_map(Op::Tick),
    ]
}

#[derive(Debug, Clone, Copy)]
enum Model {
    Open { dev: u8, held: u64 },
    Done,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ledger_accounting_is_consistent(ops in proptest::collection::vec(op(), 1..80)) {
        let rs = set(vec![
            ent("tok", BenefitType::LlmTokens, u64::MAX / 4, TriggerUnit::Never),
            ent("req", BenefitType::Requests, 1_000_000, TriggerUnit::Never),
        ]);
        let devs = [dev("d0"), dev("d1"), dev("d2")];
        let mut l = QuotaLedger::new(LedgerPolicy {
            reservation_ttl_s: 60,
            ..LedgerPolicy::default()
        });
        let mut now = T0;
        let mut model: std::collections::HashMap<u8, Model> = Default::default();
        let mut charged = [0u64; 3];
        for op in ops {
            match op {
                Op::Reserve { id, dev, est } => {
                    let r = l.reserve(&format!("r{id}"), &devs[dev as usize], &tokens(est, 0), &rs, now);
                    match model.get(&id).copied() {
                        None => {
                            prop_assert!(r.is_ok());
                            model.insert(id, Model::Open { dev, held: est });
                        }
                        Some(Model::Open { dev: d, .. }) => prop_assert_eq!(r.is_ok(), d == dev),
                        Some(Model::Done) => prop_assert_eq!(r, Err(ReserveError::RequestIdReused)),
                    }
                }
                Op::Settle { id, actual } => {
                    let out = l.settle(&format!("r{id}"), &tokens(actual, 0), now);
                    match model.get(&id).copied() {
                        Some(Model::Open { dev, .. }) => {
                            prop_assert_eq!(out, SettleOutcome::Settled);
                            charged[dev as usize] += actual;
                            model.insert(id, Model::Done);
                        }
                        Some(Model::Done) => prop_assert!(matches!(out, SettleOutcome::AlreadySettled(_))),
                        None => prop_assert_eq!(out, SettleOutcome::Unknown),
                    }
                }
                Op::Refund { id } => {
                    let out = l.refund(&format!("r{id}"), now);
                    match model.get(&id).copied() {
                        Some(Model::Open { .. }) => {
                            prop_assert_eq!(out, RefundOutcome::Refunded);
                            model.insert(id, Model::Done);
                        }
                        Some(Model::Done) => prop_assert!(matches!(out, RefundOutcome::AlreadySettled(_))),
                        None => prop_assert_eq!(out, RefundOutcome::Unknown),
                    }
                }
                Op::Progress { id, so_far } => {
                    let out = l.progress(&format!("r{id}"), &tokens(so_far, 0), &rs, now);
                    match model.get(&id).copied() {
                        Some(Model::Open { dev, held }) => {
                            prop_assert_eq!(out, Progress::Continue);
                            model.insert(id, Model::Open { dev, held: held.max(so_far) });
                        }
                        _ => prop_assert_eq!(out, Progress::Unknown),
                    }
                }
                Op::Sweep => {
                    for s in l.sweep(now) {
                        let id: u8 = s.request_id[1..].parse().unwrap();
                        match model.get(&id).copied() {
                            Some(Model::Open { dev, held }) => {
                                prop_assert_eq!(s.charged.usage.llm_input_tokens, held);
                                charged[dev as usize] += held;
                                model.insert(id, Model::Done);
                            }
                            other => prop_assert!(false, "swept {:?}", other),
                        }
                    }
                }
                Op::Tick(s) => now += s,
            }
            // Invariants after every step.
            for (i, d) in devs.iter().enumerate() {
                let (used, reserved) = used(&l, d, BenefitType::LlmTokens, RuleKind::Cumulative);
                let held: u64 = model
                    .values()
                    .filter_map(|m| match *m {
                        Model::Open { dev, held } if dev as usize == i => Some(held),
                        _ => None,
                    })
                    .sum();
                prop_assert_eq!(used, charged[i], "used = settled actuals + swept holds");
                prop_assert_eq!(reserved, held, "reserved = sum of open holds");
                let open = model.values().filter(|m| matches!(m, Model::Open { dev, .. } if *dev as usize == i)).count() as u64;
                let (_, req_reserved) = used_req(&l, d);
                prop_assert_eq!(req_reserved, open);
                let u = l.usage(&rs, d, now);
                let tok = u.iter().find(|x| x.benefit_id == "tok").unwrap();
                prop_assert_eq!(tok.remaining, tok.limit - used - reserved);
            }
            let open_total = model.values().filter(|m| matches!(m, Model::Open { .. })).count();
            prop_assert_eq!(l.open_reservations(), open_total);
        }
    }

    #[test]
    fn windows_contain_now_and_tile(start in 0u64..2_000_000_000, n in 1u32..50, unit in 0u8..3, dt in 0u64..10_000_000) {
        let unit = [TriggerUnit::Minute, TriggerUnit::Hour, TriggerUnit::Day][unit as usize];
        let mut r = single("r", "d", BenefitType::Requests, 1, unit);
        r.started_at = start;
        r.trigger_time = n;
        let p = r.period_s().unwrap();
        let w = r.window(start + dt).unwrap();
        prop_assert!(w.start <= start + dt && start + dt < w.end);
        prop_assert_eq!((w.start - start) % p, 0);
        prop_assert_eq!(w.end - w.start, p);
        prop_assert_eq!(r.window(w.end).unwrap().start, w.end);
    }
}

fn used_req(l: &QuotaLedger, d: &DeviceId) -> (u64, u64) {
    used(l, d, BenefitType::Requests, RuleKind::Cumulative)
}

/// `acked` counts what the store granted (never what was released or allowed locally);
/// allowances are reported (dirty), grants are not; `outstanding` lists unspent leases; a new
/// window starts `acked` from 0.
#[test]
fn acked_totals_allowances_and_outstanding_leases() {
    let rs = set(vec![single(
        "req",
        "d",
        BenefitType::Requests,
        100,
        TriggerUnit::Day,
    )]);
    let d = dev("d");
    let (b, k) = (BenefitType::Requests, RuleKind::Periodic);
    let mut l = ledger();
    l.set_leased(true);
    l.grant(&d, b, k, T0, 3, T0);
    l.grant(&d, b, k, T0, 2, T0);
    assert!(l.drain_dirty().is_empty(), "grants are known to the store");
    let r = record_of(&l, &d, b, k).unwrap();
    assert_eq!((r.granted, r.acked), (5, 5));
    assert_eq!(l.wants(&rs, &d, T0, 1).len(), 0);

    l.allow(&d, b, k, T0, 4, T0 + 1);
    let dirty = l.drain_dirty();
    assert_eq!(dirty.len(), 1, "an allowance must reach the store");
    assert_eq!((dirty[0].granted, dirty[0].acked), (9, 5));
    for i in 0..9 {
        l.charge(&format!("r{i}"), &d, &requests(1), &rs, T0 + 2);
    }
    assert!(l.check(&rs, &d, T0 + 2).is_err(), "9 of 9 spent");
    let w = l.wants(&rs, &d, T0 + 2, 1);
    assert_eq!(
        (w[0].used, w[0].granted, w[0].acked, w[0].want),
        (9, 9, 5, 1)
    );
    assert!(l.outstanding().is_empty(), "nothing unspent");

    l.grant(&d, b, k, T0, 6, T0 + 3);
    let _ = l.drain_dirty();
    assert_eq!(l.release_idle(T0 + 100, 60), 1);
    let r = record_of(&l, &d, b, k).unwrap();
    assert_eq!(
        (r.used, r.granted, r.acked),
        (9, 9, 11),
        "releases keep acked"
    );
    assert!(l.outstanding().is_empty());
    l.grant(&d, b, k, T0, 2, T0 + 101);
    let out = l.outstanding();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].used, out[0].granted, out[0].acked), (9, 11, 13));

    // A stale allowance for an older window is ignored; a new window starts from 0.
    l.allow(&d, b, k, T0 - DAY, 50, T0 + 102);
    assert_eq!(record_of(&l, &d, b, k).unwrap().granted, 11);
    l.grant(&d, b, k, T0 + DAY, 1, T0 + DAY);
    let r = record_of(&l, &d, b, k).unwrap();
    assert_eq!((r.used, r.granted, r.acked), (0, 1, 1));
}

// ---------------------------------------------------------------- rule set changes

/// A rule from a small universe (8 ids, 3 devices, 2 benefit types, 2 kinds), so that
/// replacements, device moves, overlaps, conflicts and invalid rules all happen often.
fn arb_rule() -> impl Strategy<Value = Rule> {
    (
        (0u8..8, 0u8..6, 0u8..3, any::<bool>()),
        (0u8..6, any::<bool>(), 0u64..4, 1u64..5, 0u8..16),
    )
        .prop_map(|((id, et, d, tokens), (status, daily, start, days, bad))| {
            let entity_type = match et {
                0..=2 => EntityType::SingleDevice,
                3 => EntityType::EnterpriseAllDevices,
                4 => EntityType::SingleCustomConsumer,
                _ => EntityType::EnterpriseAllCustomConsumers,
            };
            let started_at = T0 + start * DAY;
            Rule {
                benefit_id: format!("b{id}"),
                entity_type,
                entity_id: if entity_type.is_enterprise_wide() || bad == 0 {
                    String::new()
                } else {
                    format!("d{d}")
                },
                benefit_type: if tokens {
                    BenefitType::LlmTokens
                } else {
                    BenefitType::Requests
                },
                limit: 10,
                active_mode: ActiveMode::AbsoluteTime,
                started_at,
                ended_at: if bad == 1 {
                    started_at
                } else {
                    started_at + days * DAY
                },
                status: match status {
                    0..=3 => RuleStatus::Valid,
                    4 => RuleStatus::Frozen,
                    _ => RuleStatus::Cancel,
                },
                trigger_unit: if daily {
                    TriggerUnit::Day
                } else {
                    TriggerUnit::Never
                },
                trigger_time: 1,
            }
        })
}

/// Everything a caller can observe of a set, in the orders the set promises.
#[derive(Debug, PartialEq)]
struct Observed {
    len: usize,
    sorted: Vec<Rule>,
    by_id: Vec<Option<Rule>>,
    per_device: Vec<Vec<String>>,
    applicable: Vec<Vec<String>>,
    enterprise: Vec<String>,
}

fn observe(rs: &RuleSet) -> Observed {
    let devices: Vec<DeviceId> = (0..4).map(|d| dev(&format!("d{d}"))).collect();
    let names = |it: &mut dyn Iterator<Item = &Rule>| -> Vec<String> {
        it.map(|r| r.benefit_id.clone()).collect()
    };
    let mut sorted: Vec<Rule> = rs.iter().cloned().collect();
    sorted.sort_by(|a, b| a.benefit_id.cmp(&b.benefit_id));
    Observed {
        len: rs.len(),
        sorted,
        by_id: (0..9).map(|i| rs.get(&format!("b{i}")).cloned()).collect(),
        per_device: devices
            .iter()
            .map(|d| names(&mut rs.for_device(d)))
            .collect(),
        applicable: devices
            .iter()
            .flat_map(|d| (0..9).map(move |k| (d, T0 + k * DAY)))
            .map(|(d, t)| names(&mut rs.applicable(d, t)))
            .collect(),
        enterprise: names(&mut rs.enterprise_rules()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A sequence of `with` calls gives the set `RuleSet::new` builds from the resulting list
    /// (the old "copy every rule and rebuild"), and refuses exactly the changes that rebuild
    /// would refuse, with `admits`' errors.
    #[test]
    fn with_matches_a_rebuild(
        initial in proptest::collection::vec(arb_rule(), 0..6),
        changes in proptest::collection::vec(arb_rule(), 1..40),
    ) {
        let (mut rs, mut list) = match RuleSet::new(initial.clone()) {
            Ok(rs) => (rs, initial),
            Err(_) => (RuleSet::default(), Vec::new()),
        };
        // Every snapshot, to check at the end that later changes left it as it was.
        let mut history = vec![(rs.clone(), observe(&rs))];
        for rule in changes {
            let mut next_list: Vec<Rule> = list
                .iter()
                .filter(|r| r.benefit_id != rule.benefit_id)
                .cloned()
                .collect();
            next_list.push(rule.clone());
            let rebuilt = RuleSet::new(next_list.clone());
            match rs.with(rule.clone()) {
                Ok(next) => {
                    let rebuilt = rebuilt.map_err(|e| {
                        TestCaseError::fail(format!("with accepted {rule:?}, rebuild refused: {e}"))
                    })?;
                    let observed = observe(&next);
                    prop_assert_eq!(&observed, &observe(&rebuilt));
                    prop_assert_eq!(next.iter().count(), next.len());
                    let again = RuleSet::new(next.iter().cloned().collect()).unwrap();
                    prop_assert_eq!(&observe(&again), &observed);
                    history.push((next.clone(), observed));
                    rs = next;
                    list = next_list;
                }
                Err(e) => {
                    prop_assert!(
                        rebuilt.is_err(),
                        "with refused {:?} ({}), rebuild accepted",
                        rule,
                        e
                    );
                    prop_assert_eq!(Some(e), rs.admits(&rule).err());
                }
            }
        }
        for (old, observed) in &history {
            prop_assert_eq!(&observe(old), observed, "an older snapshot changed");
        }
        let mut back = rs.clone().into_rules();
        back.sort_by(|a, b| a.benefit_id.cmp(&b.benefit_id));
        prop_assert_eq!(back, observe(&rs).sorted);
    }
}

/// `grows_with_session_time` says exactly which benefits `amount` charges session time to.
#[test]
fn session_time_benefits_agree_with_amount() {
    for prices in [
        PriceTable::default(),
        PriceTable {
            voice_session_per_second: 1,
            ..PriceTable::default()
        },
    ] {
        let idle = Consumption::request(Usage::default());
        let timed = Consumption {
            voice_session_ms: 5_000,
            ..idle
        };
        for b in BenefitType::ALL {
            let grows = timed.amount(b, &prices) > idle.amount(b, &prices);
            assert_eq!(b.grows_with_session_time(&prices), grows, "{b} {prices:?}");
        }
    }
}

/// Which devices the relay must report every second: those with a valid, unended rule that
/// charges session time (their own or the fleet's), including rules that start later.
#[test]
fn devices_whose_rules_meter_session_time() {
    let priced = PriceTable {
        voice_session_per_second: 1_000,
        ..PriceTable::default()
    };
    let none = PriceTable::default();
    let mut frozen = single(
        "frozen",
        "d-frozen",
        BenefitType::VoiceSessionMs,
        1,
        TriggerUnit::Never,
    );
    frozen.status = RuleStatus::Frozen;
    let mut ended = single(
        "ended",
        "d-ended",
        BenefitType::VoiceUnifiedDurationCustom,
        1,
        TriggerUnit::Never,
    );
    ended.started_at = T0 - 100;
    ended.ended_at = T0;
    let mut later = single(
        "later",
        "d-later",
        BenefitType::VoiceUnifiedDurationSystem,
        1,
        TriggerUnit::Never,
    );
    later.started_at = T0 + 100;
    let rs = set(vec![
        single(
            "t",
            "d-time",
            BenefitType::VoiceSessionMs,
            3000,
            TriggerUnit::Never,
        ),
        single(
            "a",
            "d-audio",
            BenefitType::AudioInMs,
            3000,
            TriggerUnit::Never,
        ),
        single(
            "p",
            "d-points",
            BenefitType::ResourcePoint,
            10,
            TriggerUnit::Day,
        ),
        frozen,
        ended,
        later,
    ]);
    let yes = |d: &str, p: &PriceTable| rs.meters_session_time(&dev(d), T0, p);
    assert!(yes("d-time", &none));
    assert!(
        yes("d-later", &none),
        "a rule starting later counts already"
    );
    assert!(
        !yes("d-audio", &priced),
        "audio rules do not grow while idle"
    );
    assert!(!yes("d-frozen", &none));
    assert!(!yes("d-ended", &none));
    assert!(!yes("d-unknown", &priced));
    assert!(
        yes("d-points", &priced),
        "credits priced per session second"
    );
    assert!(
        !yes("d-points", &none),
        "credits without a session-time price"
    );
    let fleet = set(vec![ent(
        "e",
        BenefitType::VoiceUnifiedDurationSystem,
        60,
        TriggerUnit::Day,
    )]);
    assert!(fleet.meters_session_time(&dev("any"), T0, &none));
}

/// A deleted device leaves nothing behind: counters, pending writes and open holds go, and a
/// late settlement of one of its requests charges nothing.
#[test]
fn a_forgotten_device_leaves_nothing() {
    let rs = set(vec![single(
        "tok",
        "gone",
        BenefitType::LlmTokens,
        1000,
        TriggerUnit::Day,
    )]);
    let (gone, kept) = (dev("gone"), dev("kept"));
    let mut l = ledger();
    l.charge("a", &gone, &tokens(10, 0), &rs, T0);
    let _ = l.reserve("b", &gone, &tokens(100, 0), &rs, T0).unwrap();
    let rs_kept = set(vec![single(
        "tok2",
        "kept",
        BenefitType::LlmTokens,
        1000,
        TriggerUnit::Day,
    )]);
    let _ = l
        .reserve("c", &kept, &tokens(100, 0), &rs_kept, T0)
        .unwrap();
    assert_eq!(l.forget_device(&gone), 1);
    assert_eq!(
        l.counter(&gone, BenefitType::LlmTokens, RuleKind::Periodic),
        None
    );
    assert!(l.drain_dirty().iter().all(|r| r.device != gone));
    assert_eq!(
        l.settle("b", &tokens(50, 0), T0 + 1),
        SettleOutcome::Unknown
    );
    assert_eq!(
        l.counter(&gone, BenefitType::LlmTokens, RuleKind::Periodic),
        None
    );
    assert_eq!(l.open_reservations(), 1, "the other device's hold stays");
}
