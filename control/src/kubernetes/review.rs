//! Projected ServiceAccount tokens as bootstrap tokens, checked with the TokenReview API.
//!
//! With `--kubernetes`, `POST /v1/certify` also takes the token the kubelet projects into a pod
//! (a JWT for the audience [`AUDIENCE`], expiring and rotated by the kubelet). The control plane
//! asks the API server to review it; the identity certified is the namespace and service account
//! the review names (`system:serviceaccount:NS:SA`), never what the caller claims. Where the
//! review names the pod the token is bound to, that pod must exist and run under the same
//! service account.
//!
//! The token is a secret: it is sent only to the API server, and no error or log line holds it.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::quoted::Quoted;

/// The audience the projected token must carry.
pub const AUDIENCE: &str = "outrider";
/// The `extra` key of a review that names the token's pod.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// How long a review (and the pod lookup) may take.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks projected ServiceAccount tokens with the API server.
#[derive(Clone)]
pub struct Reviewer {
    client: Client,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reviewer")
    }
}

pub use crate::authority::{ReviewError, Reviewed};

impl Reviewer {
    /// A reviewer using `client` (it needs `create` on `tokenreviews` and `get` on `pods`).
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Reviews `token`; the service account it was issued for.
    pub async fn review(&self, token: &str) -> Result<Reviewed, ReviewError> {
        tokio::time::timeout(REVIEW_TIMEOUT, self.review_now(token))
            .await
            .map_err(|_| ReviewError::Unavailable("no answer in time".into()))?
    }

    async fn review_now(&self, token: &str) -> Result<Reviewed, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![AUDIENCE.to_string()]),
                token: Some(token.to_string()),
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                ReviewError::Unavailable(scrub(&crate::runtime::Chain(&e).to_string(), token))
            })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(ReviewError::Rejected(scrub(&why, token)));
        }
        if let Some(audiences) = &status.audiences {
            if !audiences.iter().any(|a| a == AUDIENCE) {
                return Err(ReviewError::Rejected(format!(
                    "the token is not for the audience {AUDIENCE}"
                )));
            }
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let reviewed = service_account(&username)
            .ok_or_else(|| ReviewError::NotServiceAccount(Quoted(&username).to_string()))?;
        let pod = user
            .extra
            .as_ref()
            .and_then(|e| e.get(POD_NAME))
            .and_then(|names| names.first());
        if let Some(pod) = pod {
            self.check_pod(&reviewed, pod).await?;
        }
        Ok(reviewed)
    }

    /// The pod a token is bound to must exist and run under the token's account.
    async fn check_pod(&self, reviewed: &Reviewed, pod: &str) -> Result<(), ReviewError> {
        let found = Api::<Pod>::namespaced(self.client.clone(), &reviewed.namespace)
            .get_opt(pod)
            .await
            .map_err(|e| ReviewError::Unavailable(crate::runtime::Chain(&e).to_string()))?;
        let at = format!("{}/{}", reviewed.namespace, Quoted(pod));
        let Some(found) = found else {
            return Err(ReviewError::Pod(format!(
                "the token's pod {at} does not exist"
            )));
        };
        let account = found
            .spec
            .and_then(|s| s.service_account_name)
            .unwrap_or_else(|| "default".into());
        if account != reviewed.service_account {
            return Err(ReviewError::Pod(format!(
                "the token's pod {at} runs under the service account {}, not {}",
                Quoted(&account),
                Quoted(&reviewed.service_account)
            )));
        }
        Ok(())
    }
}

/// `system:serviceaccount:NS:SA` → (NS, SA).
pub fn service_account(username: &str) -> Option<Reviewed> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then(|| Reviewed {
        namespace: ns.to_string(),
        service_account: sa.to_string(),
    })
}

/// `message` with `token` cut out, should an API server echo it.
fn scrub(message: &str, token: &str) -> String {
    let message = crate::quoted::shorten_message(message, 300);
    if token.is_empty() {
        message
    } else {
        message.replace(token, "<token>")
    }
}

impl crate::authority::TokenReview for Reviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Reviewed, ReviewError>> + Send + 'a>,
    > {
        Box::pin(Reviewer::review(self, token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_usernames() {
        assert_eq!(
            service_account("system:serviceaccount:shop:web"),
            Some(Reviewed {
                namespace: "shop".into(),
                service_account: "web".into()
            })
        );
        for bad in [
            "system:serviceaccount:shop",
            "system:serviceaccount::web",
            "system:serviceaccount:shop:",
            "system:serviceaccount:a:b:c",
            "system:node:n1",
            "alice",
        ] {
            assert_eq!(service_account(bad), None, "{bad}");
        }
        assert_eq!(scrub("bad token abc.def", "abc.def"), "bad token <token>");
    }
}
