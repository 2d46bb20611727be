//! Server policies: what the control plane says about who may call each of this workload's
//! ports. The inbound stack looks a connection's port up here and records the policy on the
//! connection's span; authorization by peer identity enforces it once mTLS lands.

use std::sync::Arc;

use outrider_control::api::ServerPolicy;
use tokio::sync::watch;

use crate::discovery::View;

/// The workload's server policies, from the latest view.
#[derive(Debug, Clone)]
pub struct Policies {
    views: Option<watch::Receiver<View>>,
}

impl Policies {
    /// Policies from `views` (none: no control plane, no policies).
    pub fn new(views: Option<watch::Receiver<View>>) -> Self {
        Self { views }
    }

    /// The policy for `port`, if the view has one.
    pub fn for_port(&self, port: u16) -> Option<ServerPolicy> {
        let view = self.views.as_ref()?.borrow().clone()?;
        find(&view, port)
    }
}

fn find(view: &Arc<outrider_control::api::WatchResponse>, port: u16) -> Option<ServerPolicy> {
    view.inbound
        .servers
        .iter()
        .find(|s| s.port == port)
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrider_control::mesh::{Mesh, DEMO_MESH};

    #[test]
    fn a_port_gets_the_policy_of_the_latest_view() {
        let mesh = Mesh::parse(DEMO_MESH).unwrap();
        let view = mesh
            .view(&"demo/payments-api".parse().unwrap(), "v1")
            .unwrap();
        let (tx, rx) = watch::channel(None);
        let policies = Policies::new(Some(rx));
        assert!(policies.for_port(8080).is_none(), "no view yet");
        tx.send_replace(Some(Arc::new(view)));
        let policy = policies.for_port(8080).unwrap();
        assert!(policy.plaintext);
        assert_eq!(
            policy.allow[0].to_string(),
            "spiffe://outrider.local/ns/demo/sa/loadgen"
        );
        assert!(
            policies.for_port(9090).is_none(),
            "no policy for other ports"
        );
        assert!(Policies::new(None).for_port(8080).is_none());
    }
}
