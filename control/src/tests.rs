//! Mesh config validation: every error path names its key; the README's example round-trips.

use std::time::{Duration, Instant};

use crate::api::{Balancer, ServiceProtocol, UnknownDestinations, WorkloadId};
use crate::mesh::{Mesh, DEMO_MESH, MAX_MESH_BYTES};

fn id(s: &str) -> WorkloadId {
    s.parse().unwrap()
}

/// Parses `yaml` expecting failure; returns the `path: message` lines.
fn errors(yaml: &str) -> Vec<String> {
    match Mesh::parse(yaml) {
        Ok(m) => panic!("expected errors, got {m:?}"),
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

fn has(errors: &[String], needle: &str) -> bool {
    errors.iter().any(|e| e.contains(needle))
}

const BASE: &str = "
services:
  - name: pay
    addresses: [198.18.100.1:80]
    endpoints:
      - address: 127.0.0.1:9001
workloads:
  - name: default/web
";

#[test]
fn the_demo_mesh_is_valid() {
    let mesh = Mesh::parse(DEMO_MESH).unwrap();
    assert_eq!(mesh.services.len(), 1);
    let s = &mesh.services[0];
    assert_eq!(s.id(), "demo/payments-api");
    assert_eq!(s.protocol, ServiceProtocol::Http1);
    assert_eq!(s.endpoints.len(), 3);
    assert_eq!(s.routes[0].timeout_ms, Some(2000));
    assert_eq!(s.routes[1].retry.as_ref().unwrap().budget_percent, 20);
    assert_eq!(s.breaker.as_ref().unwrap().open_ms, 10_000);
    assert_eq!(s.balancer, Balancer::P2cEwma);
    let retry = s.routes[1].retry.as_ref().unwrap();
    assert_eq!(retry.statuses, vec![502, 503, 504]);
    assert_eq!((retry.backoff_ms, retry.non_idempotent), (25, false));
    let view = mesh.view(&id("demo/loadgen"), "v1").unwrap();
    assert_eq!(view.outbound.services.len(), 1);
    assert_eq!(
        view.outbound.unknown_destinations,
        UnknownDestinations::Passthrough
    );
    let server = mesh.view(&id("demo/payments-api"), "v1").unwrap();
    assert_eq!(server.inbound.servers[0].port, 8080);
    assert!(mesh.view(&id("demo/nobody"), "v1").is_none());
}

#[test]
fn the_readme_example_is_the_demo_mesh_and_round_trips() {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("<!-- mesh-example -->")
        .expect("README marks its mesh example");
    let block = &readme[start..];
    let yaml_start = block.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let yaml = &block[yaml_start..];
    let yaml = &yaml[..yaml.find("```").expect("closing fence")];
    assert_eq!(
        yaml, DEMO_MESH,
        "README example and control/demo-mesh.yaml differ"
    );
    let mesh = Mesh::parse(yaml).unwrap();
    // Through the API types and JSON and back.
    let view = mesh.view(&id("demo/loadgen"), "x-1").unwrap();
    let json = serde_json::to_string(&view).unwrap();
    let back: crate::api::WatchResponse = serde_json::from_str(&json).unwrap();
    assert_eq!(back, view);
}

#[test]
fn yaml_syntax_and_unknown_keys() {
    let e = errors("services: [\n");
    assert_eq!(e.len(), 1, "{e:?}");
    // Every unknown and every missing key is reported, each with its path.
    let e = errors(
        "colour: blue\nservices:\n  - adresses: [1.2.3.4:80]\n    endpoints:\n      - weigth: 2\n    routes:\n      - match: { prefix: /a }\n        retry: {}\n    breaker: {}\nworkloads:\n  - servers: [{ prot: 80 }]\n",
    );
    for line in [
        "colour: unknown key; expected one of: trust_domain, unknown_destinations, services, workloads",
        "services[0].adresses: unknown key",
        "services[0].name: missing key",
        "services[0].endpoints[0].weigth: unknown key",
        "services[0].endpoints[0].address: missing key",
        "services[0].routes[0].match.prefix: unknown key",
        "services[0].routes[0].retry.attempts: missing key",
        "services[0].breaker.consecutive_failures: missing key",
        "services[0].breaker.open_for: missing key",
        "workloads[0].name: missing key",
    ] {
        assert!(
            e.iter().any(|x| x.starts_with(line)),
            "missing `{line}` in\n{}",
            e.join("\n")
        );
    }
    // A value of the wrong type stops parsing; it is still reported with its path, once.
    let e = errors("services:\n  - name: a\n    endpoints:\n      - address: 1.2.3.4:80\n        weight: heavy\n");
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("services[0].endpoints[0].weight: invalid type"),
        "{e:?}"
    );
}

#[test]
fn every_semantic_error_has_its_key_path() {
    let yaml = "
unknown_destinations: sometimes
services:
  - name: Pay_Api
    namespace: -bad
    addresses: [nowhere, 10.0.0.1:0]
    protocol: smtp
    endpoints:
      - address: 127.0.0.1:9001
        weight: 0
        identity: alice
      - address: 127.0.0.1:9001
    routes:
      - name: r
        match: { path_prefix: slow, path: exact, method: get, headers: { X-Bad: v } }
        timeout: 5x
        retry: { attempts: 11, budget: lots }
      - name: r
        timeout: 0s
      - name: Bad Name
    breaker: { consecutive_failures: 0, open_for: soon }
    balancer: random
  - name: ok
    addresses: []
workloads:
  - name: web
  - name: default/web
    calls: [missing]
    unknown_destinations: never
    servers:
      - port: 0
      - port: 8080
        allow: [bob]
      - port: 8080
";
    let e = errors(yaml);
    for (path, what) in [
        ("unknown_destinations", "unknown policy \"sometimes\""),
        ("services[0].name", "invalid name \"Pay_Api\""),
        ("services[0].namespace", "invalid namespace \"-bad\""),
        ("services[0].addresses[0]", "invalid address \"nowhere\""),
        ("services[0].addresses[1]", "port 0"),
        ("services[0].protocol", "unknown protocol \"smtp\""),
        (
            "services[0].endpoints[0].weight",
            "weight 0 is out of range",
        ),
        (
            "services[0].endpoints[0].identity",
            "invalid identity \"alice\"",
        ),
        ("services[0].endpoints[1].address", "duplicate endpoint"),
        (
            "services[0].routes[0].match.path_prefix",
            "must start with /",
        ),
        ("services[0].routes[0].match.path", "must start with /"),
        (
            "services[0].routes[0].match.method",
            "invalid method \"get\"",
        ),
        (
            "services[0].routes[0].match.headers.X-Bad",
            "invalid header name",
        ),
        ("services[0].routes[0].timeout", "invalid duration \"5x\""),
        ("services[0].routes[0].retry.attempts", "more than 10"),
        (
            "services[0].routes[0].retry.budget",
            "invalid budget \"lots\"",
        ),
        ("services[0].routes[1].name", "duplicate route name"),
        (
            "services[0].routes[2].name",
            "invalid route name \"Bad Name\"",
        ),
        ("services[0].routes[1].timeout", "longer than 0"),
        ("services[0].breaker.consecutive_failures", "at least 1"),
        ("services[0].breaker.open_for", "invalid duration \"soon\""),
        ("services[0].balancer", "unknown balancer \"random\""),
        ("services[1].addresses", "at least one address"),
        ("workloads[0].name", "invalid workload \"web\""),
        ("workloads[1].calls[0]", "unknown service \"missing\""),
        (
            "workloads[1].unknown_destinations",
            "unknown policy \"never\"",
        ),
        ("workloads[1].servers[0].port", "invalid port 0"),
        (
            "workloads[1].servers[1].allow[0]",
            "invalid identity \"bob\"",
        ),
        ("workloads[1].servers[2].port", "port 8080 has two policies"),
    ] {
        let line = format!("{path}: ");
        assert!(
            e.iter().any(|x| x.starts_with(&line) && x.contains(what)),
            "missing `{path}: ...{what}...` in\n{}",
            e.join("\n")
        );
    }
}

#[test]
fn duplicates_across_services_and_workloads() {
    let yaml = format!("{BASE}  - name: default/web\n");
    assert!(has(&errors(&yaml), "workloads[1].name: duplicate workload"));
    let yaml = "
services:
  - name: a
    addresses: [198.18.100.1:80]
  - name: a
    addresses: [198.18.100.1:80]
";
    let e = errors(yaml);
    assert!(
        has(&e, "services[1].name: duplicate service \"default/a\""),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "services[1].addresses[0]: 198.18.100.1:80 is already an address"
        ),
        "{e:?}"
    );
}

#[test]
fn views_filter_by_calls_and_override_the_unknown_policy() {
    let yaml = "
unknown_destinations: refuse
services:
  - { name: a, addresses: [198.18.100.1:80] }
  - { name: b, namespace: other, addresses: [198.18.100.2:80] }
workloads:
  - { name: default/all }
  - { name: default/only-b, calls: [other/b], unknown_destinations: passthrough }
";
    let mesh = Mesh::parse(yaml).unwrap();
    let all = mesh.view(&id("default/all"), "1").unwrap();
    assert_eq!(all.outbound.services.len(), 2);
    assert_eq!(
        all.outbound.unknown_destinations,
        UnknownDestinations::Refuse
    );
    let only = mesh.view(&id("default/only-b"), "1").unwrap();
    assert_eq!(
        only.outbound
            .services
            .iter()
            .map(|s| s.id())
            .collect::<Vec<_>>(),
        ["other/b"]
    );
    assert_eq!(
        only.outbound.unknown_destinations,
        UnknownDestinations::Passthrough
    );
    assert!(Mesh::parse(BASE).is_ok());
    let zero = "services:\n  - name: a\n    addresses: [198.18.100.1:80]\n    breaker: { consecutive_failures: 1, open_for: 0s }\n";
    assert!(has(
        &errors(zero),
        "services[0].breaker.open_for: must be longer than 0"
    ));
}

#[test]
fn identities_and_workloads_are_typed_in_the_mesh() {
    let mesh = Mesh::parse(DEMO_MESH).unwrap();
    let ep = &mesh.services[0].endpoints[0];
    let identity = ep.identity.as_ref().unwrap();
    assert_eq!(identity.service_account(), "payments-api");
    assert_eq!(identity.namespace(), "demo");
    let server = &mesh.workloads[&id("demo/payments-api")].servers[0];
    assert_eq!(
        server.allow[0].to_string(),
        "spiffe://outrider.local/ns/demo/sa/loadgen"
    );
    assert!(mesh.workloads.contains_key(&id("demo/loadgen")));
    // A SPIFFE id whose path is not /ns/NS/sa/SA is refused, with its key path.
    let yaml =
        format!("{BASE}    servers:\n      - port: 80\n        allow: [spiffe://td/custom/path]\n");
    let e = errors(&yaml);
    assert!(
        has(
            &e,
            "workloads[0].servers[0].allow[0]: invalid identity \"spiffe://td/custom/path\": the path is not"
        ),
        "{e:?}"
    );
}

#[test]
fn deep_nesting_is_refused_fast_with_its_line() {
    for deep in [
        format!("services: {}{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!("services:\n  - name: a\n    x: {}", "{a: ".repeat(50_000)),
        format!("services:\n{}", "- ".repeat(100_000)),
    ] {
        assert!(deep.len() >= 200_000);
        let started = Instant::now();
        let e = errors(&deep);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(500), "took {took:?}");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("<yaml>: line ") && e[0].contains("nested more than 64 levels"),
            "{e:?}"
        );
    }
    let e = errors(&format!("a: 1\nb: 2\nservices: {}", "[".repeat(70)));
    assert!(e[0].starts_with("<yaml>: line 3: "), "{e:?}");
    // 64 levels pass the pre-scan (and then meet the schema).
    let ok = format!("x: {}{}", "[".repeat(63), "]".repeat(63));
    assert!(!errors(&ok)[0].contains("nested"));
}

#[test]
fn a_file_over_the_size_limit_is_refused_before_parsing() {
    let mut big = String::from("services: []\n");
    big.push_str(&"#".repeat(MAX_MESH_BYTES));
    let e = errors(&big);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].contains("more than the limit of 16777216 bytes"),
        "{e:?}"
    );
}

#[test]
fn an_empty_mesh_file_is_refused() {
    for empty in [
        "",
        "\n",
        "   \n\t\n",
        "# just a comment\n# another\n",
        "---\n",
        "---\n...\n",
    ] {
        let e = errors(empty);
        assert_eq!(e.len(), 1, "{empty:?}: {e:?}");
        assert!(
            e[0].starts_with("<yaml>: empty mesh file: nearly always a truncated write"),
            "{empty:?}: {e:?}"
        );
    }
    // An explicitly empty mesh is fine.
    assert!(Mesh::parse("{}").unwrap().services.is_empty());
    assert!(Mesh::parse("services: []\n").is_ok());
}

#[test]
fn errors_cut_long_values() {
    let huge = "a".repeat(1_000_000);
    let cases = [
        format!("unknown_destinations: {huge}\n"),
        format!("services:\n  - name: {huge}\n    addresses: [1.2.3.4:80]\n"),
        format!("services:\n  - name: a\n    addresses: [{huge}]\n"),
        format!("services:\n  - name: a\n    addresses: [1.2.3.4:80]\n    routes:\n      - timeout: {huge}\n        match: {{ method: {huge}, path: {huge} }}\n"),
        // A key longer than 1024 characters must be an explicit `? key`.
        format!("services:\n  - name: a\n    addresses: [1.2.3.4:80]\n    routes:\n      - match:\n          headers:\n            ? {huge}\n            : v\n"),
        format!("workloads:\n  - name: {huge}\n"),
        format!("workloads:\n  - name: a/b\n    calls: [{huge}]\n"),
        format!("? {huge}\n: 1\n"),
        // Errors from the YAML library quote values too.
        format!("services:\n  - name: a\n    endpoints:\n      - address: 1.2.3.4:80\n        weight: {huge}\n"),
        format!("services: {huge}\n"),
    ];
    for yaml in &cases {
        let e = errors(yaml);
        let total: usize = e.iter().map(String::len).sum();
        assert!(
            total < 400 * e.len(),
            "{} bytes of errors: {}",
            total,
            e.iter()
                .map(|l| &l[..l.len().min(300)])
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(e.iter().any(|l| l.contains("(1000000 bytes)")), "{e:?}");
    }
}

#[test]
fn a_duplicate_key_stops_parsing_and_is_reported_with_its_path() {
    // Not collected with the other errors (serde stops at it): documented in the README.
    let e = errors("services:\n  - name: a\n    name: b\n    addresses: [nowhere]\nworkloads:\n  - name: web\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("services[0]"), "{e:?}");
    assert!(e[0].contains("duplicate field `name`"), "{e:?}");
}

#[test]
fn allow_entries_are_identities_or_namespaces_and_ports_have_a_default_policy() {
    use crate::api::{DefaultPolicy, Identity, IdentityMatch};
    let yaml = format!(
        "{BASE}    default_policy: mesh-only\n    servers:\n      - port: 80\n        allow:\n          - spiffe://outrider.local/ns/demo/sa/web\n          - spiffe://outrider.local/ns/batch/*\n"
    );
    let mesh = Mesh::parse(&yaml).unwrap();
    let view = mesh.view(&id("default/web"), "1").unwrap();
    assert_eq!(view.inbound.default_policy, DefaultPolicy::MeshOnly);
    assert_eq!(view.trust_domain, "outrider.local");
    let allow = &view.inbound.servers[0].allow;
    assert!(matches!(allow[0], IdentityMatch::Exact(_)));
    assert_eq!(
        allow[1],
        IdentityMatch::Namespace {
            trust_domain: "outrider.local".into(),
            namespace: "batch".into()
        }
    );
    let who = |s: &str| s.parse::<Identity>().unwrap();
    assert!(allow[1].matches(&who("spiffe://outrider.local/ns/batch/sa/any")));
    assert!(!allow[1].matches(&who("spiffe://outrider.local/ns/batchx/sa/any")));
    assert!(!allow[1].matches(&who("spiffe://other.td/ns/batch/sa/any")));
    assert!(allow[0].matches(&who("spiffe://outrider.local/ns/demo/sa/web")));
    assert!(!allow[0].matches(&who("spiffe://outrider.local/ns/demo/sa/web2")));
    // JSON: strings both ways.
    let json = serde_json::to_string(&view).unwrap();
    assert!(
        json.contains("\"spiffe://outrider.local/ns/batch/*\""),
        "{json}"
    );
    assert!(json.contains("\"default_policy\":\"mesh-only\""), "{json}");
    let back: crate::api::WatchResponse = serde_json::from_str(&json).unwrap();
    assert_eq!(back, view);
    // The default is allow-all; the trust domain is the mesh's.
    let mesh = Mesh::parse(&format!("trust_domain: prod.example\n{BASE}")).unwrap();
    let view = mesh.view(&id("default/web"), "1").unwrap();
    assert_eq!(view.inbound.default_policy, DefaultPolicy::AllowAll);
    assert_eq!(view.trust_domain, "prod.example");
}

#[test]
fn bad_allow_entries_default_policies_and_trust_domains_name_their_keys() {
    let yaml = format!(
        "trust_domain: Prod!\n{BASE}    default_policy: open\n    servers:\n      - port: 80\n        allow:\n          - spiffe://outrider.local/ns/demo/*/x\n          - spiffe://outrider.local/ns/Bad/*\n          - spiffe://outrider.local/*\n          - https://outrider.local/ns/demo/*\n          - spiffe://outrider.local/ns/demo/sa/*\n"
    );
    let e = errors(&yaml);
    for (path, what) in [
        ("trust_domain", "invalid trust domain \"Prod!\""),
        (
            "workloads[0].default_policy",
            "unknown default policy \"open\": expected allow-all, mesh-only or deny",
        ),
        ("workloads[0].servers[0].allow[0]", "invalid identity"),
        (
            "workloads[0].servers[0].allow[1]",
            "the namespace has a character",
        ),
        (
            "workloads[0].servers[0].allow[2]",
            "a wildcard path must be /ns/NAMESPACE/*",
        ),
        (
            "workloads[0].servers[0].allow[4]",
            "only a whole namespace can be a wildcard",
        ),
        (
            "workloads[0].servers[0].allow[3]",
            "does not start with spiffe://",
        ),
        ("workloads[0].servers[0].allow[4]", "invalid identity"),
    ] {
        let line = format!("{path}: ");
        assert!(
            e.iter().any(|x| x.starts_with(&line) && x.contains(what)),
            "missing `{path}: ...{what}...` in\n{}",
            e.join("\n")
        );
    }
}
