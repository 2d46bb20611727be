//! A policy document (a mesh config's workloads and their `servers`), then the inbound's
//! authorization of plaintext and mesh callers on every listed port and one unlisted one: no
//! panic, and the rules hold whatever the document says: a port that does not say `plaintext`
//! never admits a plaintext caller, an `allow` list admits only identities it matches, a
//! `deny` default admits nobody on an unlisted port, and before any view `deny` admits nobody.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrider_control::api::{DefaultPolicy, Identity};
use outrider_control::mesh::Mesh;
use outrider_proxy::fuzzing::{authorize, authorize_without_view};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mesh) = Mesh::parse(text) else {
        return;
    };
    let callers: Vec<Identity> = [
        "spiffe://outrider.local/ns/demo/sa/web",
        "spiffe://outrider.local/ns/other/sa/x",
        "spiffe://other.td/ns/demo/sa/web",
    ]
    .iter()
    .map(|s| s.parse().expect("a valid identity"))
    .collect();
    for id in mesh.workloads.keys() {
        let view = mesh.view(id, "v-1").expect("a listed workload has a view");
        let mut ports: Vec<u16> = view.inbound.servers.iter().map(|s| s.port).collect();
        let unlisted = (1..=u16::MAX).find(|p| !ports.contains(p));
        ports.extend(unlisted);
        for port in ports {
            let server = view.inbound.servers.iter().find(|s| s.port == port);
            let plaintext = authorize(&view, port, None);
            match server {
                Some(s) if !s.plaintext => assert!(!plaintext, "plaintext admitted"),
                Some(_) => assert!(plaintext),
                None if view.inbound.default_policy != DefaultPolicy::AllowAll => {
                    assert!(!plaintext)
                }
                None => assert!(plaintext),
            }
            for caller in &callers {
                let admitted = authorize(&view, port, Some(caller));
                match server {
                    Some(s) if !s.allow.is_empty() => assert_eq!(
                        admitted,
                        s.allow.iter().any(|a| a.matches(caller)),
                        "an allow list admits exactly what it matches"
                    ),
                    Some(_) => assert_eq!(
                        admitted,
                        caller.trust_domain() == view.trust_domain,
                        "any identity of the mesh's own trust domain"
                    ),
                    None if view.inbound.default_policy == DefaultPolicy::Deny => {
                        assert!(!admitted)
                    }
                    None => {}
                }
            }
        }
    }
    for caller in [None, callers.first()] {
        assert!(!authorize_without_view(DefaultPolicy::Deny, caller));
        assert!(authorize_without_view(DefaultPolicy::AllowAll, caller));
    }
});
