//! The CNI protocol as the runtime speaks it (CNI spec 1.0.0, also 0.4.0 and 0.3.x configs):
//! the `CNI_*` environment, the network configuration on stdin, the versions we answer and the
//! spec's error object.
//!
//! The plugin's own keys in its conflist entry (all optional): `kubeconfig` (the file the
//! installer writes, default [`DEFAULT_KUBECONFIG`]), `apiTimeoutSeconds` (the bound on the pod
//! lookup, 1 to 10, default [`DEFAULT_API_TIMEOUT_SECS`]) and `excludeNamespaces` (pods there
//! are passed through, default [`DEFAULT_EXCLUDE_NAMESPACES`]). Every other key, the
//! runtime's included, is ignored; `prevResult` is kept byte for byte.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The versions this plugin answers, oldest first (`VERSION`'s `supportedVersions`).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The version `VERSION` reports when the runtime sends none.
pub const LATEST_VERSION: &str = "1.0.0";
/// Where the installer writes the plugin's kubeconfig (in the host's CNI config directory).
pub const DEFAULT_KUBECONFIG: &str = "/etc/cni/net.d/outrider-cni.kubeconfig";
/// The default bound on the pod lookup, in seconds.
pub const DEFAULT_API_TIMEOUT_SECS: u64 = 3;
/// The largest bound accepted: the kubelet must never wait long on us.
pub const MAX_API_TIMEOUT_SECS: u64 = 10;
/// Namespaces whose pods are passed through by default: the system's and the mesh's own (the
/// control plane, and the installer's DaemonSet, which must come up before the plugin works).
pub const DEFAULT_EXCLUDE_NAMESPACES: [&str; 3] =
    ["kube-system", "outrider-system", "outrider-cni"];

/// The spec's well-known error codes we use, and our own (100 and up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 1: incompatible CNI version.
    IncompatibleVersion = 1,
    /// 4: invalid necessary environment variables.
    InvalidEnv = 4,
    /// 6: failed to decode content.
    Decode = 6,
    /// 7: invalid network config.
    InvalidConfig = 7,
    /// 11: try again later (the API server did not answer in time; the runtime retries).
    TryAgainLater = 11,
    /// 100: the pod's annotations do not make a valid rule set.
    BadAnnotations = 100,
    /// 101: programming or verifying the rules in the pod's namespace failed.
    Rules = 101,
    /// 102: the pod's network namespace cannot be entered.
    Netns = 102,
}

/// A CNI error: printed on stdout as the spec's error object, the plugin then exits 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// The error code.
    pub code: Code,
    /// A short message.
    pub msg: String,
    /// Longer details (may be empty).
    pub details: String,
}

impl CniError {
    /// An error with a code and message, no details.
    pub fn new(code: Code, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// The same error with details.
    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The spec's error object for `version` (the config's, or [`LATEST_VERSION`]).
    pub fn to_json(&self, version: &str) -> String {
        let mut obj = serde_json::Map::new();
        obj.insert("cniVersion".into(), version.into());
        obj.insert("code".into(), (self.code as u32).into());
        obj.insert("msg".into(), self.msg.clone().into());
        if !self.details.is_empty() {
            obj.insert("details".into(), self.details.clone().into());
        }
        serde_json::Value::Object(obj).to_string()
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code as u32)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Set up: program the rules.
    Add,
    /// Tear down: remove them (idempotent).
    Del,
    /// Verify them.
    Check,
    /// Report the supported versions.
    Version,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(s: &str) -> Result<Command, CniError> {
        match s {
            "ADD" => Ok(Command::Add),
            "DEL" => Ok(Command::Del),
            "CHECK" => Ok(Command::Check),
            "VERSION" => Ok(Command::Version),
            other => Err(CniError::new(
                Code::InvalidEnv,
                format!("CNI_COMMAND `{other}` is not ADD, DEL, CHECK or VERSION"),
            )),
        }
    }
}

/// The `CNI_*` environment of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for VERSION).
    pub container_id: String,
    /// `CNI_NETNS`: a path; may be empty on DEL (the namespace is already gone).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs.
    pub args: BTreeMap<String, String>,
}

impl Env {
    /// Reads the environment through `var` (so tests need not set process variables).
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let command = Command::parse(&var("CNI_COMMAND").unwrap_or_default())?;
        let get = |name: &str, required: bool| -> Result<String, CniError> {
            match var(name) {
                Some(v) if !v.is_empty() => Ok(v),
                _ if required => Err(CniError::new(
                    Code::InvalidEnv,
                    format!("{name} is not set; the runtime must set it for this command"),
                )),
                _ => Ok(String::new()),
            }
        };
        let not_version = command != Command::Version;
        Ok(Env {
            command,
            container_id: get("CNI_CONTAINERID", not_version)?,
            // DEL may come after the namespace is gone: then CNI_NETNS may be empty.
            netns: get(
                "CNI_NETNS",
                matches!(command, Command::Add | Command::Check),
            )?,
            ifname: get("CNI_IFNAME", not_version)?,
            args: parse_args(&var("CNI_ARGS").unwrap_or_default())?,
        })
    }

    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS`, when the runtime is Kubernetes'.
    pub fn pod(&self) -> Option<(&str, &str)> {
        match (
            self.args.get("K8S_POD_NAMESPACE"),
            self.args.get("K8S_POD_NAME"),
        ) {
            (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => Some((ns, name)),
            _ => None,
        }
    }
}

/// Parses `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
pub fn parse_args(text: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in text.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                Code::InvalidEnv,
                format!("CNI_ARGS entry `{pair}` is not KEY=VALUE"),
            ));
        };
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// The part of the network configuration this plugin reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    prev_result: Option<Box<RawValue>>,
    kubeconfig: Option<String>,
    api_timeout_seconds: Option<u64>,
    exclude_namespaces: Option<Vec<String>>,
}

/// The plugin's network configuration, validated.
#[derive(Debug, Clone)]
pub struct NetConf {
    /// `cniVersion`: one of [`SUPPORTED_VERSIONS`].
    pub cni_version: String,
    /// `name` of the network.
    pub name: String,
    /// `prevResult`, exactly as received.
    pub prev_result: Option<Box<RawValue>>,
    /// The kubeconfig for the pod lookup.
    pub kubeconfig: String,
    /// The bound on the pod lookup.
    pub api_timeout: Duration,
    /// Namespaces whose pods are passed through.
    pub exclude_namespaces: Vec<String>,
}

/// The `cniVersion` of `stdin` when it can be read, for error objects; else [`LATEST_VERSION`].
pub fn version_of(stdin: &str) -> String {
    serde_json::from_str::<RawConf>(stdin)
        .ok()
        .and_then(|c| c.cni_version)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_owned())
}

impl NetConf {
    /// Parses and checks the configuration on stdin.
    pub fn parse(stdin: &str) -> Result<NetConf, CniError> {
        let raw: RawConf = serde_json::from_str(stdin).map_err(|e| {
            CniError::new(Code::Decode, "the network configuration is not valid JSON")
                .with_details(e.to_string())
        })?;
        let cni_version = raw.cni_version.ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                "the network configuration has no cniVersion",
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "cniVersion {cni_version} is not supported; supported: {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if raw.kind.is_none() {
            return Err(CniError::new(
                Code::InvalidConfig,
                "the network configuration has no type",
            ));
        }
        let secs = raw.api_timeout_seconds.unwrap_or(DEFAULT_API_TIMEOUT_SECS);
        if !(1..=MAX_API_TIMEOUT_SECS).contains(&secs) {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!(
                    "apiTimeoutSeconds {secs} is out of range 1-{MAX_API_TIMEOUT_SECS}: the \
                     kubelet waits on this plugin"
                ),
            ));
        }
        Ok(NetConf {
            cni_version,
            name: raw.name.unwrap_or_default(),
            prev_result: raw.prev_result,
            kubeconfig: raw
                .kubeconfig
                .unwrap_or_else(|| DEFAULT_KUBECONFIG.to_owned()),
            api_timeout: Duration::from_secs(secs),
            exclude_namespaces: raw.exclude_namespaces.unwrap_or_else(|| {
                DEFAULT_EXCLUDE_NAMESPACES
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect()
            }),
        })
    }

    /// Whether this version has `CHECK` (0.4.0 and later).
    pub fn has_check(&self) -> bool {
        !self.cni_version.starts_with("0.3.")
    }
}

/// `VERSION`'s answer: `cniVersion` echoes the request's when we support it.
pub fn version_answer(stdin: &str) -> String {
    serde_json::json!({
        "cniVersion": version_of(stdin),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Env::read(|k| map.get(k).cloned())
    }

    #[test]
    fn environment_is_read_and_checked_per_command() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
            ),
        ])
        .unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.pod(), Some(("shop", "web-0")));
        let missing = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc")]).unwrap_err();
        assert_eq!(missing.code, Code::InvalidEnv);
        assert!(missing.msg.contains("CNI_NETNS"), "{missing}");
        // DEL without a namespace (already gone) is fine; VERSION needs nothing.
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert!(del.netns.is_empty() && del.pod().is_none());
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
        assert_eq!(
            env(&[("CNI_COMMAND", "GC")]).unwrap_err().code,
            Code::InvalidEnv
        );
        assert_eq!(env(&[]).unwrap_err().code, Code::InvalidEnv);
        let bad = env(&[("CNI_COMMAND", "VERSION"), ("CNI_ARGS", "K8S_POD_NAME")]).unwrap_err();
        assert!(bad.msg.contains("not KEY=VALUE"), "{bad}");
    }

    #[test]
    fn config_versions_and_keys() {
        for v in SUPPORTED_VERSIONS {
            let c = NetConf::parse(&format!(
                r#"{{"cniVersion":"{v}","name":"k8s","type":"outrider-cni"}}"#
            ))
            .unwrap();
            assert_eq!(c.has_check(), !v.starts_with("0.3."), "{v}");
            assert_eq!(c.kubeconfig, DEFAULT_KUBECONFIG);
            assert_eq!(c.api_timeout, Duration::from_secs(3));
        }
        let e = NetConf::parse(r#"{"cniVersion":"0.2.0","type":"outrider-cni"}"#).unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        assert_eq!(NetConf::parse("{").unwrap_err().code, Code::Decode);
        assert_eq!(NetConf::parse("[]").unwrap_err().code, Code::Decode);
        assert_eq!(
            NetConf::parse(r#"{"type":"outrider-cni"}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        let e = NetConf::parse(r#"{"cniVersion":"1.0.0","type":"x","apiTimeoutSeconds":60}"#)
            .unwrap_err();
        assert!(e.msg.contains("apiTimeoutSeconds 60"), "{e}");
        // prevResult is kept byte for byte, key order and spacing included.
        let prev = r#"{"z": 1,  "a": {"ips": []}}"#;
        let c = NetConf::parse(&format!(
            r#"{{"cniVersion":"1.0.0","type":"x","prevResult":{prev},"excludeNamespaces":["a"]}}"#
        ))
        .unwrap();
        assert_eq!(c.prev_result.unwrap().get(), prev);
        assert_eq!(c.exclude_namespaces, ["a"]);
    }

    #[test]
    fn version_answer_and_error_object() {
        let v: serde_json::Value =
            serde_json::from_str(&version_answer(r#"{"cniVersion":"0.4.0"}"#)).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"][3], "1.0.0");
        let v: serde_json::Value = serde_json::from_str(&version_answer("")).unwrap();
        assert_eq!(v["cniVersion"], LATEST_VERSION);
        let e = CniError::new(Code::TryAgainLater, "api down").with_details("timeout");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("0.3.1")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"0.3.1","code":11,"msg":"api down","details":"timeout"})
        );
    }
}
