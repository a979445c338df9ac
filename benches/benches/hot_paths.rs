//! Per-request policy hot paths: device token verification (`Keyring::verify`), quota check
//! and settle (`QuotaLedger::check` / `reserve` + `settle` / `charge`), rule lookup
//! (`RuleSet::applicable`) and one rule change (`RuleSet::with`) with 1M single-device rules.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BatchSize, Criterion, black_box, criterion_group, criterion_main};
use policy::ids::DeviceId;
use policy::metering::Usage;
use policy::quota::{
    BenefitType, Consumption, EntityType, FOREVER, LedgerPolicy, QuotaLedger, Rule, RuleSet,
    RuleStatus, TriggerUnit,
};
use policy::token::{Claims, ISSUER, Keyring};

const NOW: u64 = 1_800_000_000;

fn token_verify(c: &mut Criterion) {
    let ring = Keyring::new([("k1", &[7u8; 32][..]), ("k2", &[9u8; 32][..])], "k2").unwrap();
    let claims = Claims {
        iss: ISSUER.to_owned(),
        sub: DeviceId::parse("speaker-0001234").unwrap(),
        iat: NOW - 60,
        exp: NOW + 3600,
        generation: 3,
        cred: Some("cred-1".to_owned()),
        cred_serial: 1,
        jti: format!("{:032x}", 0x1234_5678_9abc_u128),
    };
    let token = ring.mint(&claims);
    c.bench_function("token/verify", |b| {
        b.iter(|| ring.verify(black_box(&token), NOW, 60).unwrap())
    });
    let mut bad = token.clone();
    bad.pop();
    bad.push('A');
    c.bench_function("token/verify_bad_signature", |b| {
        b.iter(|| ring.verify(black_box(&bad), NOW, 60).unwrap_err())
    });
}

fn rule(i: usize, entity: EntityType, benefit: BenefitType, periodic: bool) -> Rule {
    Rule {
        benefit_id: format!("r{i}"),
        entity_type: entity,
        entity_id: if entity == EntityType::SingleDevice {
            device_id(i)
        } else {
            String::new()
        },
        benefit_type: benefit,
        limit: 1_000_000_000,
        active_mode: Default::default(),
        started_at: 0,
        ended_at: FOREVER,
        status: RuleStatus::Valid,
        trigger_unit: if periodic {
            TriggerUnit::Day
        } else {
            TriggerUnit::Never
        },
        trigger_time: 1,
    }
}

fn device_id(i: usize) -> String {
    format!("dev-{i:08}")
}

/// `n` devices with one `single_device` request rule each, plus fleet-wide token and
/// periodic request rules.
fn rule_set(n: usize) -> RuleSet {
    let mut rules: Vec<Rule> = (0..n)
        .map(|i| rule(i, EntityType::SingleDevice, BenefitType::Requests, false))
        .collect();
    rules.push(rule(
        n,
        EntityType::EnterpriseAllDevices,
        BenefitType::LlmTokens,
        false,
    ));
    rules.push(rule(
        n + 1,
        EntityType::EnterpriseAllDevices,
        BenefitType::Requests,
        true,
    ));
    RuleSet::new(rules).unwrap()
}

fn quota(c: &mut Criterion) {
    let n = 1_000_000;
    let start = std::time::Instant::now();
    let rules = rule_set(n);
    eprintln!("RuleSet::new with {n} device rules: {:?}", start.elapsed());
    // The naive way to change one rule (what the gateway did before `RuleSet::with`): copy
    // every other rule and rebuild. Once, for comparison: it takes about a second.
    let start = std::time::Instant::now();
    let changed = rule(7, EntityType::SingleDevice, BenefitType::Requests, false);
    let mut all: Vec<Rule> = rules
        .iter()
        .filter(|r| r.benefit_id != changed.benefit_id)
        .cloned()
        .collect();
    all.push(changed);
    let rebuilt = RuleSet::new(all).unwrap();
    eprintln!(
        "One rule changed by copying and rebuilding {} rules: {:?}",
        rebuilt.len(),
        start.elapsed()
    );
    drop(rebuilt);
    let devices: Vec<DeviceId> = (0..4096)
        .map(|i| DeviceId::parse(&device_id(i * 241 % n)).unwrap())
        .collect();
    let mut k = 0usize;
    c.bench_function("rules/applicable_1M_rules", |b| {
        b.iter(|| {
            k = (k + 1) & 4095;
            rules.applicable(black_box(&devices[k]), NOW).count()
        })
    });
    let unknown = DeviceId::parse("not-a-rule-device").unwrap();
    c.bench_function("rules/applicable_1M_rules_fleet_only", |b| {
        b.iter(|| rules.applicable(black_box(&unknown), NOW).count())
    });
    // One rule changed (admin API, cluster): the next snapshot derived from this one, and
    // dropped again (as the gateway drops the old one after the swap).
    let mut v = 0usize;
    c.bench_function("rules/with_1M_rules_replace", |b| {
        b.iter_batched(
            || {
                v += 1;
                let mut r = rule(
                    v * 241 % n,
                    EntityType::SingleDevice,
                    BenefitType::Requests,
                    false,
                );
                r.limit = v as u64;
                r
            },
            |r| drop(rules.with(r).unwrap()),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("rules/with_1M_rules_add", |b| {
        b.iter_batched(
            || {
                v += 1;
                rule(
                    n + 2 + v,
                    EntityType::SingleDevice,
                    BenefitType::Requests,
                    false,
                )
            },
            |r| drop(rules.with(r).unwrap()),
            BatchSize::SmallInput,
        )
    });

    let mut ledger = QuotaLedger::new(LedgerPolicy::default());
    let usage = Usage {
        llm_input_tokens: 600,
        llm_output_tokens: 40,
        ..Usage::default()
    };
    let actual = Consumption::request(usage);
    let estimate = Consumption::request(Usage {
        llm_input_tokens: 1000,
        ..Usage::default()
    });
    c.bench_function("quota/check", |b| {
        b.iter(|| {
            k = (k + 1) & 4095;
            ledger.check(&rules, black_box(&devices[k]), NOW).unwrap()
        })
    });
    let mut id = 0u64;
    let ids: Vec<String> = (0..1_000_000).map(|i| format!("{i:016x}")).collect();
    c.bench_function("quota/reserve_settle", |b| {
        b.iter_batched(
            || {
                id += 1;
                (
                    ids[(id % 1_000_000) as usize].clone(),
                    id.is_multiple_of(1_000_000),
                )
            },
            |(rid, reset)| {
                k = (k + 1) & 4095;
                let dev = &devices[k];
                // Request ids are remembered after settling: restart with a fresh ledger
                // when they would repeat.
                if reset {
                    ledger = QuotaLedger::new(LedgerPolicy::default());
                }
                let _held = ledger.reserve(&rid, dev, &estimate, &rules, NOW).unwrap();
                ledger.settle(&rid, &actual, NOW)
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("quota/check_charge", |b| {
        b.iter_batched(
            || {
                id += 1;
                (
                    ids[(id % 1_000_000) as usize].clone(),
                    id.is_multiple_of(1_000_000),
                )
            },
            |(rid, reset)| {
                k = (k + 1) & 4095;
                if reset {
                    ledger = QuotaLedger::new(LedgerPolicy::default());
                }
                let dev = &devices[k];
                ledger.check(&rules, dev, NOW).unwrap();
                ledger.charge(&rid, dev, &actual, &rules, NOW)
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, token_verify, quota);
criterion_main!(benches);
