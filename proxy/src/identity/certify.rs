//! Getting and renewing the proxy's certificate.
//!
//! The proxy makes an ECDSA P-256 key in memory (never written anywhere), sends a CSR naming its
//! SPIFFE identity with its bootstrap token, and installs the certificate it gets back with the
//! control plane's trust bundle. It renews at about 70% of the certificate's lifetime (65% to 75%,
//! jittered so a fleet does not renew at once), with a fresh key, without a restart and without
//! closing a connection. A failed renewal keeps the current certificate and retries with backoff
//! until it expires.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outrider_control::api::Identity;
use outrider_control::client::Backoff;
use prometheus::{IntCounter, IntGauge};

use super::store::{IdentityStore, Leaf};
use crate::errors::BoxError;
use crate::readiness::{BlockReady, Readiness};

/// What the certificate authority answers.
#[derive(Debug, Clone)]
pub struct Certified {
    /// The chain, leaf first (PEM).
    pub chain_pem: String,
    /// The trust bundle (PEM).
    pub trust_anchors_pem: String,
}

/// Something that signs CSRs for a token: the control plane's certify API, or a CA in process.
pub trait Certify: Send + Sync + 'static {
    /// Sends `csr_pem` with `token`.
    fn certify<'a>(
        &'a self,
        token: &'a str,
        csr_pem: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Certified, BoxError>> + Send + 'a>>;
}

pub use super::token::{claimed_identity, TokenSource};

/// A new key and a CSR for `identity`: the PEM CSR and the key's PKCS#8 DER.
pub fn new_csr(identity: &Identity) -> Result<(String, Vec<u8>), BoxError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
        identity.as_str(),
    )?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((csr, key.serialize_der()))
}

/// When to renew a certificate valid until `not_after`, received at `now`: after `fraction`
/// (0.65 to 0.75) of the time it has left. Counted from its arrival, not its `not_before`: a CA
/// backdates `not_before` to absorb clock skew, which would otherwise make a short-lived
/// certificate look mostly spent at once. Zero when it has expired already.
pub fn renew_in(not_after: SystemTime, now: SystemTime, fraction: f64) -> Duration {
    not_after
        .duration_since(now)
        .unwrap_or_default()
        .mul_f64(fraction.clamp(0.0, 1.0))
}

/// The renewal metrics.
#[derive(Debug, Clone)]
pub struct IdentityMetrics {
    /// Unix time the current certificate expires (0: none).
    pub expiry: IntGauge,
    /// Successful certifications.
    pub renewed: IntCounter,
    /// Failed certifications.
    pub failed: IntCounter,
}

impl IdentityMetrics {
    /// Registers the metrics on `registry`.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let expiry = IntGauge::new(
            "outrider_identity_cert_expiry_timestamp_seconds",
            "Unix time at which the proxy's certificate expires (0: no certificate yet)",
        )?;
        let outcomes = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "outrider_identity_certify_total",
                "Certificate requests to the control plane, by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(expiry.clone()))?;
        registry.register(Box::new(outcomes.clone()))?;
        Ok(Self {
            expiry,
            renewed: outcomes.with_label_values(&["ok"]),
            failed: outcomes.with_label_values(&["error"]),
        })
    }
}

/// When the next renewal is due, shared between the renewal task and `/identity`.
pub type NextRenewal = Arc<std::sync::Mutex<Option<SystemTime>>>;

/// The certify-and-renew task.
pub struct Renewal {
    /// Where the certificate goes.
    pub store: Arc<IdentityStore>,
    /// Who signs.
    pub ca: Arc<dyn Certify>,
    /// The bootstrap token.
    pub token: TokenSource,
    /// Counted here.
    pub metrics: IdentityMetrics,
    /// When the next renewal is due (read by `/identity`).
    pub next: NextRenewal,
    /// Held back (`an unexpired certificate`) while the proxy's own certificate has expired.
    pub readiness: Readiness,
}

/// The shortest wait between two certifications, whatever the certificate says: a certificate
/// that arrives expired (clock skew, a tiny lifetime) must not make renewal a hot loop.
pub const RENEW_FLOOR: Duration = Duration::from_millis(500);

/// How long to wait after a certificate valid until `not_after` arrived at `now`: `fraction` of
/// its time left, at least [`RENEW_FLOOR`]; one that has already expired is retried with
/// `backoff` (which a usable certificate resets).
pub fn wait_after_success(
    not_after: SystemTime,
    now: SystemTime,
    fraction: f64,
    backoff: &mut Backoff,
) -> Duration {
    if not_after <= now {
        return backoff.next_delay().max(RENEW_FLOOR);
    }
    backoff.reset();
    renew_in(not_after, now, fraction).max(RENEW_FLOOR)
}

impl Renewal {
    /// One certification: token, key, CSR, answer, installed.
    pub async fn once(&self) -> Result<Arc<Leaf>, BoxError> {
        let (token, identity) = self.token.read().await?;
        let (csr, key) = new_csr(&identity)?;
        let certified = self.ca.certify(&token, &csr).await?;
        let leaf = Leaf::from_pem(&certified.chain_pem, key)?;
        if leaf.identity != identity {
            return Err(format!(
                "the control plane issued a certificate for {}, not {identity}",
                leaf.identity
            )
            .into());
        }
        self.store.set_anchors(&certified.trust_anchors_pem)?;
        self.store.set_leaf(leaf);
        self.store
            .leaf()
            .ok_or_else(|| "the certificate was not installed".into())
    }

    /// Certifies, then renews forever; `ready` is released at the first certificate. While the
    /// current certificate has expired (renewals failing), readiness is held back.
    pub async fn run(self, ready: BlockReady) {
        let mut ready = Some(ready);
        let mut expired: Option<BlockReady> = None;
        let mut backoff = Backoff::new(RENEW_FLOOR, Duration::from_secs(60));
        loop {
            let wait = match self.once().await {
                Ok(leaf) => {
                    self.metrics.renewed.inc();
                    let expiry = leaf
                        .not_after
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    self.metrics.expiry.set(expiry.as_secs() as i64);
                    let fraction = 0.65 + 0.1 * fastrand::f64();
                    let now = SystemTime::now();
                    let wait = wait_after_success(leaf.not_after, now, fraction, &mut backoff);
                    if leaf.not_after <= now {
                        tracing::warn!(identity = %leaf.identity, retry_in = ?wait, "the control plane issued a certificate that has already expired (clock skew?)");
                    } else if ready.take().is_some() {
                        tracing::info!(identity = %leaf.identity, valid_for = ?leaf.not_after.duration_since(now).unwrap_or_default(), renew_in = ?wait, "certificate issued");
                    } else {
                        tracing::debug!(identity = %leaf.identity, renew_in = ?wait, "certificate renewed");
                    }
                    wait
                }
                Err(e) => {
                    self.metrics.failed.inc();
                    let wait = backoff.next_delay();
                    let still_valid = self
                        .store
                        .leaf()
                        .and_then(|l| l.not_after.duration_since(SystemTime::now()).ok());
                    tracing::warn!(error = %e, retry_in = ?wait, current_valid_for = ?still_valid, "cannot get a certificate from the control plane; keeping the current one");
                    wait
                }
            };
            // Wake up at the current certificate's expiry at the latest, to report it.
            let left = self
                .store
                .leaf()
                .and_then(|l| l.not_after.duration_since(SystemTime::now()).ok());
            let wait = match left {
                Some(left) => wait.min(left.max(RENEW_FLOOR)),
                None => wait,
            };
            if let Ok(mut next) = self.next.lock() {
                *next = Some(SystemTime::now() + wait);
            }
            self.report_expiry(&mut expired);
            tokio::time::sleep(wait).await;
            self.report_expiry(&mut expired);
        }
    }

    /// Holds readiness back while the current certificate has expired.
    fn report_expiry(&self, expired: &mut Option<BlockReady>) {
        let now = SystemTime::now();
        let is_expired = self.store.leaf().is_some_and(|l| l.not_after <= now);
        match (is_expired, expired.is_some()) {
            (true, false) => {
                tracing::warn!(
                    "the proxy's own certificate has expired: not ready until a new one arrives"
                );
                *expired = Some(self.readiness.block("an unexpired certificate"));
            }
            (false, true) => *expired = None,
            _ => {}
        }
    }
}

/// The control plane's certify API.
impl Certify for outrider_control::client::Certifier {
    fn certify<'a>(
        &'a self,
        token: &'a str,
        csr_pem: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Certified, BoxError>> + Send + 'a>> {
        Box::pin(async move {
            let rsp = outrider_control::client::Certifier::certify(self, token, csr_pem).await?;
            Ok(Certified {
                chain_pem: rsp.chain,
                trust_anchors_pem: rsp.trust_anchors,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::identity::testing::{token_for, SigningCa, TestCa};

    const WEB: &str = "spiffe://outrider.local/ns/demo/sa/web";

    #[test]
    fn renewal_is_due_at_the_given_fraction_of_the_time_left() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(renew_in(now + day, now, 0.7), day.mul_f64(0.7));
        // A 5 s certificate (whatever its backdated not_before) renews after 3.5 s.
        let five = Duration::from_secs(5);
        assert_eq!(renew_in(now + five, now, 0.7), five.mul_f64(0.7));
        assert_eq!(renew_in(now, now, 0.7), Duration::ZERO, "expired: now");
        assert_eq!(
            renew_in(now - day, now, 0.7),
            Duration::ZERO,
            "long expired"
        );
    }

    #[test]
    fn a_token_claims_one_identity() {
        let td = "outrider.local";
        assert_eq!(claimed_identity(&token_for(WEB), td).unwrap().as_str(), WEB);
        for bad in ["", "v1", "v1.x.y", "v2.e30.x", "v1.e30.x", "v1.e30.x.y"] {
            assert!(claimed_identity(bad, td).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_csr_names_the_identity_and_nothing_else() {
        let (csr, key) = new_csr(&WEB.parse().unwrap()).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        assert_eq!(parsed.params.subject_alt_names.len(), 1);
        assert!(
            matches!(&parsed.params.subject_alt_names[0], rcgen::SanType::URI(u) if u.as_str() == WEB)
        );
        assert!(!key.is_empty());
        let (_, key2) = new_csr(&WEB.parse().unwrap()).unwrap();
        assert_ne!(key, key2, "a fresh key every time");
    }

    #[tokio::test(start_paused = true)]
    async fn certificates_renew_at_about_70_percent_and_a_failure_keeps_the_current_one() {
        let registry = prometheus::Registry::new();
        let metrics = IdentityMetrics::register(&registry).unwrap();
        let store = IdentityStore::new();
        let ca = Arc::new(SigningCa::new(
            TestCa::new("root").unwrap(),
            Duration::from_secs(100),
        ));
        let readiness = crate::readiness::Readiness::new();
        let renewal = Renewal {
            store: store.clone(),
            ca: ca.clone(),
            token: TokenSource::Fixed(token_for(WEB).into()),
            metrics: metrics.clone(),
            next: Default::default(),
            readiness: readiness.clone(),
        };
        let blocker = readiness.block("the first certificate");
        assert!(readiness.check().is_err());
        tokio::spawn(renewal.run(blocker));
        // Not due before 65% of the 100 s lifetime.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(metrics.renewed.get(), 1);
        assert!(
            readiness.check().is_ok(),
            "ready once the first certificate is in"
        );
        let first = store.leaf().unwrap();
        assert_eq!(first.identity.as_str(), WEB);
        // Due by 75%.
        tokio::time::sleep(Duration::from_secs(16)).await;
        assert_eq!(metrics.renewed.get(), 2);
        let second = store.leaf().unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_ne!(first.key.cert[0], second.key.cert[0]);
        // The control plane goes away: the current certificate stays, retries back off.
        ca.failing.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(100)).await;
        let failures = metrics.failed.get();
        assert!(
            (2..=20).contains(&failures),
            "retried with backoff: {failures}"
        );
        assert!(Arc::ptr_eq(&second, &store.leaf().unwrap()), "kept");
        ca.failing.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(metrics.renewed.get(), 3, "back once the control plane is");
    }

    #[test]
    fn renewal_waits_at_least_the_floor_and_backs_off_on_an_expired_certificate() {
        let mut backoff = Backoff::new(RENEW_FLOOR, Duration::from_secs(60));
        let now = SystemTime::now();
        // Expired on arrival: never zero, and longer each time.
        let first = wait_after_success(now - Duration::from_secs(1), now, 0.7, &mut backoff);
        let second = wait_after_success(now, now, 0.7, &mut backoff);
        assert!(first >= RENEW_FLOOR, "{first:?}");
        assert!(second >= RENEW_FLOOR && second >= first, "{second:?}");
        // A tiny lifetime: the floor.
        let tiny = wait_after_success(now + Duration::from_millis(10), now, 0.7, &mut backoff);
        assert_eq!(tiny, RENEW_FLOOR);
        // A usable certificate: its fraction, and the backoff starts over.
        let hour = wait_after_success(now + Duration::from_secs(100), now, 0.7, &mut backoff);
        assert_eq!(hour, Duration::from_secs(70));
        let again = wait_after_success(now, now, 0.7, &mut backoff);
        assert!(again <= first * 2, "{again:?}");
    }

    #[tokio::test]
    async fn the_proxy_is_not_ready_while_its_own_certificate_has_expired() {
        let registry = prometheus::Registry::new();
        let metrics = IdentityMetrics::register(&registry).unwrap();
        // A CA whose certificates expire at once (its backdating covers the lifetime).
        let ca = Arc::new(SigningCa::new(TestCa::new("root").unwrap(), Duration::ZERO));
        let readiness = crate::readiness::Readiness::new();
        let renewal = Renewal {
            store: IdentityStore::new(),
            ca,
            token: TokenSource::Fixed(token_for(WEB).into()),
            metrics: metrics.clone(),
            next: Default::default(),
            readiness: readiness.clone(),
        };
        let task = tokio::spawn(renewal.run(readiness.block("the first certificate")));
        // Bounded: 500 looks, 10 ms apart.
        let mut status = readiness.check();
        for _ in 0..500 {
            status = readiness.check();
            if status
                .as_ref()
                .is_err_and(|e| e.contains("an unexpired certificate"))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            status.is_err_and(|e| e.contains("an unexpired certificate")),
            "not ready with an expired certificate"
        );
        // No hot loop: a handful of certifications in a second, not thousands.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let issued = metrics.renewed.get();
        task.abort();
        assert!(issued <= 5, "{issued} certifications in about a second");
    }
}
