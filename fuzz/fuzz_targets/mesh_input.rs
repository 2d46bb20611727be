//! The mesh's parsers of bytes from the network and from files: a ClientHello's ALPN markers, a
//! peer certificate's SPIFFE identity, a bootstrap token (its claim, and its verification by the
//! control plane). None may panic; a token the key did not sign never verifies.
#![no_main]

use std::sync::OnceLock;
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use outrider_control::token::TokenKey;

fn key() -> &'static TokenKey {
    static KEY: OnceLock<TokenKey> = OnceLock::new();
    KEY.get_or_init(|| TokenKey::generate().expect("a random key"))
}

fuzz_target!(|data: &[u8]| {
    outrider_proxy::fuzzing::mesh_input(data);
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = outrider_control::token::claimed_identity(token);
        assert!(
            key().verify(token, SystemTime::now()).is_err(),
            "a token not minted with the key verified"
        );
    }
});
