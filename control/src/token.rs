//! Bootstrap tokens: what entitles a proxy to a certificate for exactly one identity.
//!
//! A token is `v1.<payload>.<mac>`: `payload` is the unpadded base64url of the JSON
//! `{"sub": "spiffe://TD/ns/NS/sa/SA", "exp": <unix seconds>}`, and `mac` the unpadded base64url
//! of HMAC-SHA256 over `v1.<payload>` with the control plane's 32-byte token key. The control
//! plane mints tokens (`outrider control token`) and checks them (`POST /v1/certify`) with the
//! same key; a token names one identity and cannot be altered to name another without the key.
//! There is no revocation list: keep token lifetimes short, or rotate the key (which voids every
//! token made with the old one).
//!
//! Tokens and keys are secrets: no error message, log line or `Debug` output contains one.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::hmac;
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

use crate::api::Identity;

/// The version prefix of every token.
const PREFIX: &str = "v1.";
/// Whether `token` has the form of an Outrider bootstrap token (`v1.`), as opposed to, say, a
/// projected ServiceAccount token (a JWT).
pub fn is_bootstrap_token(token: &str) -> bool {
    token.starts_with(PREFIX)
}

/// The longest token looked at, in bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// The secret that mints and verifies tokens: 32 random bytes.
pub struct TokenKey {
    key: hmac::Key,
    bytes: [u8; 32],
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

/// Why a token was refused. Never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not `v1.<payload>.<mac>` with base64url parts and a JSON payload.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The MAC does not verify: altered, or made with another key.
    #[error("the token's signature does not verify (altered, or minted with another token key)")]
    BadSignature,
    /// Past its expiry.
    #[error("the token expired at {0} (Unix seconds)")]
    Expired(u64),
    /// The signed identity is not a valid SPIFFE identity.
    #[error("the token's identity is invalid")]
    BadIdentity,
}

/// Why a token key file cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    /// Reading or writing failed.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        error: std::io::Error,
    },
    /// The file does not hold 32 bytes as hex or base64.
    #[error("{0}: expected a 32-byte key as 64 hex digits or base64 text")]
    Format(String),
    /// The random source failed.
    #[error("the system random source failed")]
    Random,
}

/// The signed claims.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Claims {
    sub: String,
    exp: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl TokenKey {
    fn from_bytes(bytes: [u8; 32]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
            bytes,
        }
    }

    /// A new random key.
    pub fn generate() -> Result<Self, TokenKeyError> {
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| TokenKeyError::Random)?;
        Ok(Self::from_bytes(bytes))
    }

    /// Reads a key file: 64 hex digits or base64 of 32 bytes, surrounding whitespace ignored.
    pub fn from_file(path: &Path) -> Result<Self, TokenKeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| TokenKeyError::Io {
            path: shown.clone(),
            error,
        })?;
        Self::parse(text.trim()).ok_or(TokenKeyError::Format(shown))
    }

    fn parse(text: &str) -> Option<Self> {
        let from_hex = || {
            if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let mut bytes = [0u8; 32];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            Some(bytes)
        };
        let from_base64 = || {
            let decoded = STANDARD
                .decode(text)
                .or_else(|_| URL_SAFE_NO_PAD.decode(text))
                .ok()?;
            <[u8; 32]>::try_from(decoded.as_slice()).ok()
        };
        from_hex().or_else(from_base64).map(Self::from_bytes)
    }

    /// Writes the key as hex to a new file readable by its owner only (mode 0600); refuses to
    /// overwrite an existing file.
    pub fn to_file(&self, path: &Path) -> Result<(), TokenKeyError> {
        let hex: String = self.bytes.iter().map(|b| format!("{b:02x}")).collect();
        write_secret(path, format!("{hex}\n").as_bytes()).map_err(|error| TokenKeyError::Io {
            path: path.display().to_string(),
            error,
        })
    }

    /// A token entitling `identity`, valid for `ttl` from now.
    pub fn mint(&self, identity: &Identity, ttl: Duration) -> String {
        self.mint_at(identity, SystemTime::now() + ttl)
    }

    /// A token entitling `identity` until `expires`.
    pub fn mint_at(&self, identity: &Identity, expires: SystemTime) -> String {
        let claims = serde_json::json!({ "sub": identity.as_str(), "exp": unix(expires) });
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{PREFIX}{payload}");
        let tag = hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The identity `token` entitles at `now`, after checking its form, its MAC (in constant
    /// time), its expiry and the identity.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Identity, TokenError> {
        let (signed, tag, claims) = split(token)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed("the signature is not base64url"))?;
        hmac::verify(&self.key, signed.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        let claims = claims?;
        if unix(now) >= claims.exp {
            return Err(TokenError::Expired(claims.exp));
        }
        claims.sub.parse().map_err(|_| TokenError::BadIdentity)
    }
}

/// `(signed part, MAC, claims)` of a token; the claims are unverified.
fn split(token: &str) -> Result<(&str, &str, Result<Claims, TokenError>), TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed("longer than 4096 bytes"));
    }
    let rest = token
        .strip_prefix(PREFIX)
        .ok_or(TokenError::Malformed("it does not start with v1."))?;
    let (payload, tag) = rest
        .split_once('.')
        .ok_or(TokenError::Malformed("expected v1.PAYLOAD.SIGNATURE"))?;
    if tag.contains('.') {
        return Err(TokenError::Malformed("expected v1.PAYLOAD.SIGNATURE"));
    }
    let signed = &token[..PREFIX.len() + payload.len()];
    let claims = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed("the payload is not base64url"))
        .and_then(|json| {
            serde_json::from_slice::<Claims>(&json)
                .map_err(|_| TokenError::Malformed("the payload is not {\"sub\", \"exp\"} JSON"))
        });
    // A payload that does not decode is malformed whatever the MAC says.
    if let Err(e) = &claims {
        return Err(e.clone());
    }
    Ok((signed, tag, claims))
}

/// The identity a token claims, unverified, if it parses: for log lines about refused tokens.
pub fn claimed_identity(token: &str) -> Option<Identity> {
    let (_, _, claims) = split(token).ok()?;
    claims.ok()?.sub.parse().ok()
}

/// Writes `bytes` to a new file with mode 0600 (on Unix); fails if the file exists.
pub fn write_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    const WEB: &str = "spiffe://outrider.local/ns/demo/sa/web";
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_token_entitles_exactly_its_identity() {
        let key = TokenKey::generate().unwrap();
        let token = key.mint(&id(WEB), HOUR);
        assert!(token.starts_with("v1."));
        assert_eq!(key.verify(&token, SystemTime::now()), Ok(id(WEB)));
        assert_eq!(claimed_identity(&token), Some(id(WEB)));
        // Another identity cannot be put in without the key: swapping the payload breaks the MAC.
        let other = key.mint(&id("spiffe://outrider.local/ns/demo/sa/db"), HOUR);
        let (_, other_payload) = other.split('.').nth(1).map(|p| ((), p)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("v1.{other_payload}.{}", parts[2]);
        assert_eq!(
            key.verify(&forged, SystemTime::now()),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn expired_garbage_and_foreign_tokens_are_refused_distinctly() {
        let key = TokenKey::generate().unwrap();
        let now = SystemTime::now();
        let token = key.mint(&id(WEB), HOUR);
        assert_eq!(
            key.verify(&token, now + 2 * HOUR),
            Err(TokenError::Expired(unix(now + HOUR)))
        );
        let expired = key.mint_at(&id(WEB), now - Duration::from_secs(1));
        assert!(matches!(
            key.verify(&expired, now),
            Err(TokenError::Expired(_))
        ));
        let other_key = TokenKey::generate().unwrap();
        assert_eq!(other_key.verify(&token, now), Err(TokenError::BadSignature));
        // One flipped character of the MAC.
        let mut tampered = token.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(key.verify(&tampered, now), Err(TokenError::BadSignature));
        for garbage in [
            "",
            "hello",
            "v1.",
            "v1.abc",
            "v2.abc.def",
            "v1.!!!.def",
            "v1.abc.def.ghi",
            &"v1.".repeat(5000),
        ] {
            assert!(
                matches!(key.verify(garbage, now), Err(TokenError::Malformed(_))),
                "{garbage:.40}"
            );
        }
        // A well-signed token whose subject is not an identity.
        let payload = URL_SAFE_NO_PAD.encode(r#"{"sub":"alice","exp":99999999999}"#);
        let signed = format!("v1.{payload}");
        let tag = hmac::sign(&key.key, signed.as_bytes());
        let bad = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
        assert_eq!(key.verify(&bad, now), Err(TokenError::BadIdentity));
        assert_eq!(claimed_identity(&bad), None);
    }

    #[test]
    fn errors_and_debug_never_show_the_token_or_key() {
        let key = TokenKey::generate().unwrap();
        let token = key.mint(&id(WEB), HOUR);
        let mac = token.rsplit('.').next().unwrap();
        for e in [
            TokenKey::generate()
                .unwrap()
                .verify(&token, SystemTime::now()),
            key.verify(&token, SystemTime::now() + 2 * HOUR),
        ] {
            let shown = format!("{:?} {}", e, e.clone().unwrap_err());
            assert!(!shown.contains(mac), "{shown}");
        }
        let hex: String = key.bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!format!("{key:?}").contains(&hex));
    }

    #[test]
    fn key_files_round_trip_private_and_never_overwrite() {
        let dir = std::env::temp_dir().join(format!("outrider-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token.key");
        let key = TokenKey::generate().unwrap();
        key.to_file(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(key.to_file(&path).is_err(), "overwrote the key");
        let back = TokenKey::from_file(&path).unwrap();
        let token = key.mint(&id(WEB), HOUR);
        assert_eq!(back.verify(&token, SystemTime::now()), Ok(id(WEB)));
        // Base64 works too; anything else is refused with the path.
        let b64 = dir.join("b64.key");
        std::fs::write(&b64, format!("{}\n", STANDARD.encode(key.bytes))).unwrap();
        assert!(TokenKey::from_file(&b64).is_ok());
        std::fs::write(&b64, "too short").unwrap();
        let e = TokenKey::from_file(&b64).unwrap_err().to_string();
        assert!(e.contains("b64.key") && e.contains("32-byte"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
