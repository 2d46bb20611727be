//! Authorization: who may call each of this workload's ports, from the control plane's view.
//!
//! A listed port allows the identities its `allow` names (exactly, or every identity of a
//! namespace; an empty list allows any authenticated identity) and plaintext callers only when
//! it says `plaintext: true`. An unlisted port follows the workload's default policy. Decisions
//! read the latest view each time, so a policy change applies to the next request or connection.
//! Without a control plane (local mode) everything is allowed. Before the first view, a meshed
//! proxy does not know its ports' policies: a connection is held for the first view (bounded,
//! see [`Policies::wait_first_view`]), and if none arrives, `--default-inbound-policy` decides
//! (by default `deny`: fail closed, as the proxy's readiness does not stop a caller that dials
//! the pod's address).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outrider_control::api::{DefaultPolicy, Identity, InboundView, WatchResponse};
use tokio::sync::watch;

use crate::discovery::View;
use crate::errors::Denied;
use crate::metrics::PeerMetrics;

/// How often a refusal of one peer is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Peers whose last log time is kept (bounded memory).
const MAX_LOGGED_PEERS: usize = 1024;

/// The rule that refused a caller (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// The port does not allow plaintext callers.
    PlaintextNotAllowed,
    /// The caller's identity is not in the port's `allow` list.
    IdentityNotAllowed,
    /// The port is not listed and the default policy needs a mesh identity.
    MeshOnly,
    /// The port is not listed and the default policy refuses everyone.
    DefaultDeny,
    /// No view has arrived yet and `--default-inbound-policy` refuses this caller.
    NoConfig,
    /// "Any mesh identity" admits the mesh's own trust domain only.
    ForeignTrustDomain,
}

impl Rule {
    /// The label value and log wording.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Rule::PlaintextNotAllowed => "plaintext-not-allowed",
            Rule::IdentityNotAllowed => "identity-not-allowed",
            Rule::MeshOnly => "default-mesh-only",
            Rule::DefaultDeny => "default-deny",
            Rule::NoConfig => "no-config",
            Rule::ForeignTrustDomain => "foreign-trust-domain",
        }
    }
}

/// What `policy` (the `--default-inbound-policy`, before the first view) says of `peer`.
pub(crate) fn decide_without_view(
    policy: DefaultPolicy,
    peer: Option<&Identity>,
) -> Result<(), Rule> {
    match (policy, peer) {
        (DefaultPolicy::AllowAll, _) | (DefaultPolicy::MeshOnly, Some(_)) => Ok(()),
        (DefaultPolicy::MeshOnly, None) | (DefaultPolicy::Deny, _) => Err(Rule::NoConfig),
    }
}

/// What `view` says of a caller `peer` (`None`: plaintext) of `port`. "Any mesh identity" (an
/// empty `allow`, `mesh-only`) means any identity of the mesh's own trust domain: an identity
/// of another trust domain whose root the bundle holds (federation) is admitted only where an
/// `allow` list names it.
pub(crate) fn decide(view: &WatchResponse, port: u16, peer: Option<&Identity>) -> Result<(), Rule> {
    let inbound: &InboundView = &view.inbound;
    let foreign = |id: &Identity| id.trust_domain() != view.trust_domain;
    match inbound.servers.iter().find(|s| s.port == port) {
        Some(server) => match peer {
            None if server.plaintext => Ok(()),
            None => Err(Rule::PlaintextNotAllowed),
            Some(id) if server.allow.iter().any(|a| a.matches(id)) => Ok(()),
            Some(id) if server.allow.is_empty() && foreign(id) => Err(Rule::ForeignTrustDomain),
            Some(_) if server.allow.is_empty() => Ok(()),
            Some(_) => Err(Rule::IdentityNotAllowed),
        },
        None => match (inbound.default_policy, peer) {
            (DefaultPolicy::AllowAll, _) => Ok(()),
            (DefaultPolicy::MeshOnly, Some(id)) if foreign(id) => Err(Rule::ForeignTrustDomain),
            (DefaultPolicy::MeshOnly, Some(_)) => Ok(()),
            (DefaultPolicy::MeshOnly, None) => Err(Rule::MeshOnly),
            (DefaultPolicy::Deny, _) => Err(Rule::DefaultDeny),
        },
    }
}

/// The workload's server policies, from the latest view, with refusals counted and logged.
#[derive(Debug, Clone)]
pub(crate) struct Policies {
    views: Option<watch::Receiver<View>>,
    /// What applies before the first view (`--default-inbound-policy`).
    before_view: DefaultPolicy,
    metrics: PeerMetrics,
    logged: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Policies {
    /// Policies from `views` (none: no control plane, everything allowed), with `before_view`
    /// applied until the first view arrives.
    pub(crate) fn new(
        views: Option<watch::Receiver<View>>,
        before_view: DefaultPolicy,
        metrics: PeerMetrics,
    ) -> Self {
        Self {
            views,
            before_view,
            metrics,
            logged: Arc::default(),
        }
    }

    /// Holds the caller until the first view arrives, for at most `bound`: a connection that
    /// arrives while the proxy starts is then judged by the real policy, not by the default.
    pub(crate) async fn wait_first_view(&self, bound: Duration) {
        let Some(views) = &self.views else {
            return;
        };
        if views.borrow().is_some() {
            return;
        }
        let mut views = views.clone();
        let _ = tokio::time::timeout(bound, views.wait_for(|v| v.is_some())).await;
    }

    /// Whether decisions can change (there is a control plane).
    pub(crate) fn can_change(&self) -> bool {
        self.views.is_some()
    }

    /// Resolves when a new view refuses `peer` on `port` (counted and logged like any refusal);
    /// never without a control plane.
    pub(crate) async fn until_denied(&self, port: u16, peer: Option<&Identity>) {
        let Some(views) = &self.views else {
            return std::future::pending().await;
        };
        let mut views = views.clone();
        // Only changes from now on: the connection's own check read the view in force.
        views.borrow_and_update();
        loop {
            if views.changed().await.is_err() {
                return std::future::pending().await;
            }
            let denied = {
                let view = views.borrow_and_update();
                match view.as_ref() {
                    None => decide_without_view(self.before_view, peer),
                    Some(view) => decide(view, port, peer),
                }
            }
            .is_err();
            if denied && self.check(port, peer).is_err() {
                return;
            }
        }
    }

    /// Whether a plaintext caller could be admitted on `port` now (nothing is counted): a
    /// silent plaintext client of a port that refuses plaintext callers is never worth dialling
    /// the app for.
    pub(crate) fn may_admit_plaintext(&self, port: u16) -> bool {
        let Some(views) = &self.views else {
            return true;
        };
        let view = views.borrow();
        match view.as_ref() {
            None => decide_without_view(self.before_view, None).is_ok(),
            Some(view) => decide(view, port, None).is_ok(),
        }
    }

    /// A short description of `port`'s policy for the connection's span.
    pub(crate) fn describe(&self, port: u16) -> &'static str {
        let Some(views) = &self.views else {
            return "allow-all (no control plane)";
        };
        let view = views.borrow();
        let Some(view) = view.as_ref() else {
            return match self.before_view {
                DefaultPolicy::AllowAll => "allow-all (no config yet)",
                DefaultPolicy::MeshOnly => "mesh-only (no config yet)",
                DefaultPolicy::Deny => "deny (no config yet)",
            };
        };
        match view.inbound.servers.iter().find(|s| s.port == port) {
            Some(s) if s.plaintext => "listed, plaintext allowed",
            Some(_) => "listed, mesh identities only",
            None => view.inbound.default_policy.as_str(),
        }
    }

    /// Authorizes `peer` (`None`: a plaintext caller) on `port`; a refusal is counted and logged
    /// (at most once a minute per peer).
    pub(crate) fn check(&self, port: u16, peer: Option<&Identity>) -> Result<(), Denied> {
        let Some(views) = &self.views else {
            return Ok(());
        };
        let decision = {
            let view = views.borrow();
            match view.as_ref() {
                None => decide_without_view(self.before_view, peer),
                Some(view) => decide(view, port, peer),
            }
        };
        let Err(rule) = decision else {
            return Ok(());
        };
        self.metrics.denied(rule.as_str());
        let who = peer.map_or("a plaintext client", |p| p.as_str());
        if self.should_log(who) {
            tracing::info!(
                peer = who,
                port,
                rule = rule.as_str(),
                "denied by the port's policy (logged at most once a minute per peer)"
            );
        }
        Err(Denied {
            peer: who.to_string(),
            port,
            why: rule.as_str(),
        })
    }

    fn should_log(&self, who: &str) -> bool {
        let Ok(mut logged) = self.logged.lock() else {
            return false;
        };
        let now = Instant::now();
        if logged
            .get(who)
            .is_some_and(|at| now.duration_since(*at) < LOG_EVERY)
        {
            return false;
        }
        if logged.len() >= MAX_LOGGED_PEERS {
            logged.retain(|_, at| now.duration_since(*at) < LOG_EVERY);
        }
        if logged.len() < MAX_LOGGED_PEERS {
            logged.insert(who.to_string(), now);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrider_control::mesh::Mesh;

    fn inbound(yaml: &str) -> WatchResponse {
        let mesh = Mesh::parse(yaml).unwrap();
        mesh.view(&"demo/api".parse().unwrap(), "v1").unwrap()
    }

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    #[test]
    fn a_listed_port_allows_its_identities_and_plaintext_only_if_it_says_so() {
        let view = inbound(
            "workloads:\n  - name: demo/api\n    default_policy: deny\n    servers:\n      - port: 8080\n        allow: [spiffe://outrider.local/ns/demo/sa/web, 'spiffe://outrider.local/ns/ops/*']\n      - port: 9090\n        plaintext: true\n",
        );
        let web = id("spiffe://outrider.local/ns/demo/sa/web");
        let ops = id("spiffe://outrider.local/ns/ops/sa/anything");
        let other = id("spiffe://outrider.local/ns/demo/sa/other");
        assert_eq!(decide(&view, 8080, Some(&web)), Ok(()));
        assert_eq!(
            decide(&view, 8080, Some(&ops)),
            Ok(()),
            "namespace wildcard"
        );
        assert_eq!(
            decide(&view, 8080, Some(&other)),
            Err(Rule::IdentityNotAllowed)
        );
        assert_eq!(decide(&view, 8080, None), Err(Rule::PlaintextNotAllowed));
        assert_eq!(decide(&view, 9090, None), Ok(()));
        assert_eq!(
            decide(&view, 9090, Some(&other)),
            Ok(()),
            "empty allow: any identity"
        );
        assert_eq!(decide(&view, 7000, Some(&web)), Err(Rule::DefaultDeny));
    }

    #[test]
    fn unlisted_ports_follow_the_default_policy() {
        let web = id("spiffe://outrider.local/ns/demo/sa/web");
        let all = inbound("workloads:\n  - name: demo/api\n");
        assert_eq!(decide(&all, 1, None), Ok(()), "allow-all by default");
        let mesh = inbound("workloads:\n  - name: demo/api\n    default_policy: mesh-only\n");
        assert_eq!(decide(&mesh, 1, Some(&web)), Ok(()));
        assert_eq!(decide(&mesh, 1, None), Err(Rule::MeshOnly));
    }

    #[test]
    fn policy_changes_apply_to_the_next_check_and_refusals_are_counted() {
        let registry = prometheus::Registry::new();
        let metrics = crate::metrics::Metrics::register(&registry).unwrap();
        let (tx, rx) = watch::channel(None);
        let policies = Policies::new(Some(rx), DefaultPolicy::Deny, metrics.peers.clone());
        // Before the first view nobody is admitted (fail closed), and nothing is worth dialling.
        assert_eq!(policies.check(8080, None).unwrap_err().why, "no-config");
        assert!(!policies.may_admit_plaintext(8080));
        let deny =
            Mesh::parse("workloads:\n  - name: demo/api\n    default_policy: deny\n").unwrap();
        tx.send_replace(Some(Arc::new(
            deny.view(&"demo/api".parse().unwrap(), "v1").unwrap(),
        )));
        let e = policies.check(8080, None).unwrap_err();
        assert_eq!(e.why, "default-deny");
        assert_eq!(
            crate::metrics::sum(
                &registry,
                "outrider_authz_denied_total",
                &[("rule", "default-deny")]
            ),
            1.0
        );
        let allow = Mesh::parse("workloads:\n  - name: demo/api\n").unwrap();
        tx.send_replace(Some(Arc::new(
            allow.view(&"demo/api".parse().unwrap(), "v2").unwrap(),
        )));
        assert!(policies.check(8080, None).is_ok());
        assert!(Policies::new(None, DefaultPolicy::Deny, metrics.peers)
            .check(8080, None)
            .is_ok());
    }

    #[test]
    fn any_mesh_identity_means_the_meshs_own_trust_domain() {
        let view = inbound(
            "workloads:\n  - name: demo/api\n    default_policy: mesh-only\n    servers:\n      - port: 8080\n        allow: []\n      - port: 9090\n        allow: [spiffe://other.td/ns/demo/sa/web]\n",
        );
        let ours = id("spiffe://outrider.local/ns/demo/sa/web");
        let foreign = id("spiffe://other.td/ns/demo/sa/web");
        assert_eq!(decide(&view, 8080, Some(&ours)), Ok(()));
        assert_eq!(
            decide(&view, 8080, Some(&foreign)),
            Err(Rule::ForeignTrustDomain)
        );
        assert_eq!(
            decide(&view, 7000, Some(&foreign)),
            Err(Rule::ForeignTrustDomain),
            "mesh-only"
        );
        assert_eq!(decide(&view, 7000, Some(&ours)), Ok(()));
        assert_eq!(
            decide(&view, 9090, Some(&foreign)),
            Ok(()),
            "named explicitly"
        );
    }

    #[test]
    fn before_the_first_view_the_flag_decides() {
        let web = id("spiffe://outrider.local/ns/demo/sa/web");
        assert_eq!(
            decide_without_view(DefaultPolicy::Deny, Some(&web)),
            Err(Rule::NoConfig)
        );
        assert_eq!(
            decide_without_view(DefaultPolicy::MeshOnly, None),
            Err(Rule::NoConfig)
        );
        assert_eq!(
            decide_without_view(DefaultPolicy::MeshOnly, Some(&web)),
            Ok(())
        );
        assert_eq!(decide_without_view(DefaultPolicy::AllowAll, None), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_is_held_for_the_first_view_within_a_bound() {
        let registry = prometheus::Registry::new();
        let metrics = crate::metrics::Metrics::register(&registry).unwrap();
        let (tx, rx) = watch::channel(None);
        let policies = Policies::new(Some(rx), DefaultPolicy::Deny, metrics.peers);
        // No view: the hold ends at its bound.
        let start = tokio::time::Instant::now();
        policies.wait_first_view(Duration::from_secs(5)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // A view that arrives during the hold ends it, and its policy decides.
        let held = tokio::spawn({
            let policies = policies.clone();
            async move {
                let start = tokio::time::Instant::now();
                policies.wait_first_view(Duration::from_secs(5)).await;
                (start.elapsed(), policies.check(8080, None))
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let allow = Mesh::parse("workloads:\n  - name: demo/api\n").unwrap();
        tx.send_replace(Some(Arc::new(
            allow.view(&"demo/api".parse().unwrap(), "v1").unwrap(),
        )));
        let (waited, decision) = held.await.unwrap();
        assert_eq!(waited, Duration::from_secs(1));
        assert!(decision.is_ok());
    }
}
