//! Token and credential parsing never panics: gateway tokens, device JWT assertions, public
//! key PEMs and stored secret hashes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use policy::credential::{AssertionPolicy, DevicePublicKey, KeyAlgorithm, SecretHash, verify_assertion};
use policy::token::Keyring;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let keyring = Keyring::new([("k1", &[7u8; 32][..])], "k1").expect("keyring");
    let _ = keyring.verify(&text, 1_800_000_000, 60);
    let policy = AssertionPolicy::new(vec!["gateway.example".into()]);
    let _ = verify_assertion(&text, |_, _| None, &policy, 1_800_000_000);
    for alg in [KeyAlgorithm::Rs256, KeyAlgorithm::Es256] {
        let _ = DevicePublicKey::parse("k", alg, &text);
    }
    let _ = serde_json::from_slice::<SecretHash>(data);
});
