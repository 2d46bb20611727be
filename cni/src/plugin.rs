//! What the plugin does per command, for one pod.
//!
//! - `ADD`: no Kubernetes pod in `CNI_ARGS`, a pod in an excluded namespace, a `hostNetwork` pod
//!   or a pod that is not meshed (no `outrider.io/injected` annotation, or `outrider.io/inject:
//!   disabled`) is passed through: `prevResult` goes back unchanged and nothing is touched. A
//!   meshed pod's annotations become `outrider init`'s flags ([`init_argv`]), the plugin enters
//!   `CNI_NETNS` and runs [`outrider_iptables_init::execute`]: the same rule set, one
//!   `iptables-restore` transaction per family, verified, rolled back on failure.
//! - `DEL`: enters the namespace (when it still exists) and removes the outrider chains and
//!   jumps, nothing else; removing nothing is success. It needs no API lookup.
//! - `CHECK`: for a meshed pod, verifies the namespace holds exactly that rule set.
//!
//! The API lookup is bounded (`apiTimeoutSeconds`, 3 s by default). When the API server does not
//! answer in time, `ADD` fails with code 11 ("try again later"): the kubelet tears the sandbox
//! down and retries, so the pod waits instead of running uncaptured (fail closed). Istio's CNI
//! plugin and Linkerd's both fail the same way when they cannot read the pod. Pods in the
//! excluded namespaces never need the lookup, so the control plane and the installer itself can
//! start while the API server is away.

use std::collections::BTreeMap;
use std::fs::File;

use clap::Parser as _;
use outrider_iptables_init::config::{Action, Config};
use outrider_iptables_init::InitArgs;
use outrider_kubernetes::capture::Capture;
use outrider_kubernetes::inject::{ANN_INJECT, ANN_INJECTED};

use crate::lookup::{LookupError, PodInfo, PodLookup};
use crate::spec::{CniError, Code, Command, Env, NetConf};

/// Why a pod is passed through, or that it is meshed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Programme the rules for these `outrider init` flags.
    Meshed(Vec<String>),
    /// Leave the pod alone, for this reason (logged).
    PassThrough(String),
}

/// `outrider init`'s arguments for a pod's annotations: the proxy uid and a flag per capture
/// annotation, exactly as the injector writes them into `outrider-init` (one reading,
/// [`outrider_kubernetes::capture`], for both); a bad or contradictory annotation is named.
pub fn init_argv(annotations: &BTreeMap<String, String>) -> Result<Vec<String>, CniError> {
    let capture =
        Capture::from_annotations(|k| annotations.get(k).map(String::as_str)).map_err(|e| {
            CniError::new(
                Code::BadAnnotations,
                format!(
                    "the pod's annotations are not valid capture settings: {}: {}",
                    e.annotation, e.message
                ),
            )
        })?;
    let mut argv = vec!["init".to_owned()];
    argv.extend_from_slice(capture.args());
    Ok(argv)
}

/// Parses `init_argv`'s output with `outrider init`'s own parser and checks it as `outrider
/// init` does: a bad annotation is a clear error, never a partial rule set.
pub fn init_config(argv: &[String], action: Action) -> Result<Config, CniError> {
    #[derive(clap::Parser)]
    #[command(no_binary_name = false)]
    struct Init {
        #[command(flatten)]
        args: InitArgs,
    }
    let bad = |m: String| CniError::new(Code::BadAnnotations, m);
    let parsed = Init::try_parse_from(argv).map_err(|e| {
        bad(format!(
            "the pod's annotations are not valid capture settings: {}",
            e.to_string().lines().next().unwrap_or_default()
        ))
    })?;
    let mut args = parsed.args;
    args.cleanup = action == Action::Cleanup;
    Config::from_args(&args).map_err(|errors| {
        bad(format!(
            "the pod's annotations are not valid capture settings: {}",
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ))
    })
}

/// Decides what to do with a pod.
pub fn verdict(conf: &NetConf, env: &Env, lookup: &dyn PodLookup) -> Result<Verdict, CniError> {
    let Some((namespace, name)) = env.pod() else {
        return Ok(Verdict::PassThrough(
            "no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS".into(),
        ));
    };
    if conf.exclude_namespaces.iter().any(|n| n == namespace) {
        return Ok(Verdict::PassThrough(format!(
            "namespace {namespace} is excluded"
        )));
    }
    let pod: PodInfo = match lookup.pod(namespace, name) {
        Ok(Some(pod)) => pod,
        Ok(None) => {
            return Err(CniError::new(
                Code::TryAgainLater,
                format!("pod {namespace}/{name} not found in the API server yet"),
            ))
        }
        Err(e @ LookupError::Unreachable(_)) => {
            return Err(CniError::new(
                Code::TryAgainLater,
                format!(
                "cannot read pod {namespace}/{name}: the API server did not answer within {} s; \
                     the pod is not started uncaptured, the kubelet retries",
                conf.api_timeout.as_secs()
            ),
            )
            .with_details(e.to_string()))
        }
        Err(e) => {
            return Err(CniError::new(
                Code::TryAgainLater,
                format!("cannot read pod {namespace}/{name}"),
            )
            .with_details(e.to_string()))
        }
    };
    if pod.host_network {
        return Ok(Verdict::PassThrough("hostNetwork pod".into()));
    }
    if pod.annotations.get(ANN_INJECT).map(String::as_str) == Some("disabled") {
        return Ok(Verdict::PassThrough(format!("{ANN_INJECT}: disabled")));
    }
    if !pod.annotations.contains_key(ANN_INJECTED) {
        return Ok(Verdict::PassThrough(format!(
            "not meshed (no {ANN_INJECTED})"
        )));
    }
    Ok(Verdict::Meshed(init_argv(&pod.annotations)?))
}

/// Moves this thread (the process's only one: the lookup's runtime is gone) into the network
/// namespace at `path`; child processes (the iptables tools) inherit it.
fn enter_netns(path: &str) -> Result<(), CniError> {
    let file = File::open(path).map_err(|e| {
        CniError::new(
            Code::Netns,
            format!("cannot open the pod's network namespace {path}: {e}"),
        )
    })?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        CniError::new(
            Code::Netns,
            format!("cannot enter the pod's network namespace {path}: {e} (the plugin runs as root on the node)"),
        )
    })
}

/// Checks `argv` as `outrider init` flags, enters the pod's namespace and runs `step` there (apply,
/// clean up or verify); a failure is code 101 with `what` and the step's reason.
fn in_pod(
    env: &Env,
    argv: &[String],
    action: Action,
    step: fn(&Config) -> Result<(), outrider_iptables_init::backend::Failure>,
    what: String,
) -> Result<(), CniError> {
    let config = init_config(argv, action)?;
    enter_netns(&env.netns)?;
    step(&config).map_err(|e| CniError::new(Code::Rules, what).with_details(e.to_string()))
}

/// Runs one command; `Ok(Some(text))` is printed on stdout.
pub fn run(
    env: &Env,
    stdin: &str,
    lookup: &dyn Fn(&NetConf) -> Box<dyn PodLookup>,
) -> Result<Option<String>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(crate::spec::version_answer(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    let who = format!(
        "{} {}",
        env.pod()
            .map(|(ns, n)| format!("{ns}/{n}"))
            .unwrap_or_else(|| "a non-Kubernetes container".into()),
        env.container_id
    );
    match env.command {
        Command::Version => Ok(None),
        Command::Add => {
            let Some(prev) = &conf.prev_result else {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    "outrider-cni is a chained plugin: list it after the network plugin in the \
                     conflist (no prevResult was given)",
                ));
            };
            match verdict(&conf, env, lookup(&conf).as_ref())? {
                Verdict::PassThrough(why) => {
                    eprintln!("outrider-cni: ADD {who}: passed through ({why})");
                }
                Verdict::Meshed(argv) => {
                    in_pod(
                        env,
                        &argv,
                        Action::Apply,
                        outrider_iptables_init::execute,
                        format!("programming the capture rules for {who} failed; nothing was left applied"),
                    )?;
                    eprintln!(
                        "outrider-cni: ADD {who}: capture rules applied ({})",
                        argv[1..].join(" ")
                    );
                }
            }
            Ok(Some(prev.get().to_owned()))
        }
        Command::Del => {
            if env.netns.is_empty() || !std::path::Path::new(&env.netns).exists() {
                eprintln!("outrider-cni: DEL {who}: network namespace gone, nothing to remove");
                return Ok(None);
            }
            in_pod(
                env,
                &["init".to_owned()],
                Action::Cleanup,
                outrider_iptables_init::execute,
                format!("removing the capture rules of {who} failed"),
            )?;
            Ok(None)
        }
        Command::Check => {
            if !conf.has_check() {
                return Err(CniError::new(
                    Code::IncompatibleVersion,
                    format!("CHECK is not defined for cniVersion {}", conf.cni_version),
                ));
            }
            if let Verdict::Meshed(argv) = verdict(&conf, env, lookup(&conf).as_ref())? {
                in_pod(
                    env,
                    &argv,
                    Action::Apply,
                    outrider_iptables_init::check,
                    format!("the capture rules of {who} are not in place"),
                )?;
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use outrider_kubernetes::inject::{
        ANN_INCLUDE_INBOUND_PORTS, ANN_INCLUDE_OUTBOUND_CIDRS, ANN_INCLUDE_OUTBOUND_PORTS,
        ANN_SKIP_INBOUND_PORTS, ANN_SKIP_OUTBOUND_CIDRS, ANN_SKIP_OUTBOUND_PORTS,
    };

    struct Fixed(Result<Option<PodInfo>, LookupError>);

    impl PodLookup for Fixed {
        fn pod(&self, _: &str, _: &str) -> Result<Option<PodInfo>, LookupError> {
            self.0.clone()
        }
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn env(args: &str) -> Env {
        Env::read(|k| match k {
            "CNI_COMMAND" => Some("ADD".into()),
            "CNI_CONTAINERID" => Some("c1".into()),
            "CNI_NETNS" => Some("/nonexistent".into()),
            "CNI_IFNAME" => Some("eth0".into()),
            "CNI_ARGS" => Some(args.into()),
            _ => None,
        })
        .unwrap()
    }

    fn conf() -> NetConf {
        NetConf::parse(r#"{"cniVersion":"1.0.0","type":"outrider-cni","prevResult":{}}"#).unwrap()
    }

    #[test]
    fn annotations_become_init_flags_and_are_checked() {
        let a = ann(&[
            (ANN_SKIP_INBOUND_PORTS, "9090, 22"),
            (ANN_SKIP_OUTBOUND_CIDRS, "198.18.9.0/24"),
            (ANN_INCLUDE_INBOUND_PORTS, "8080-8082"),
            (ANN_INCLUDE_OUTBOUND_PORTS, "443,80"),
        ]);
        let argv = init_argv(&a).unwrap();
        assert_eq!(
            argv,
            [
                "init",
                "--proxy-uid",
                "1337",
                "--exclude-inbound-ports",
                "22,9090",
                "--exclude-outbound-cidrs",
                "198.18.9.0/24",
                "--include-inbound-ports",
                "8080,8081,8082",
                "--include-outbound-ports",
                "80,443",
            ]
        );
        let c = init_config(&argv, Action::Apply).unwrap();
        assert_eq!(c.exclude_inbound_ports.len(), 2);
        assert_eq!(c.include_inbound_ports.len(), 3);
        assert_eq!(c.action, Action::Apply);
        for (pairs, needle) in [
            (&[(ANN_SKIP_OUTBOUND_PORTS, "5432,99999")][..], "99999"),
            (
                &[
                    (ANN_SKIP_INBOUND_PORTS, "9000-9010"),
                    (ANN_INCLUDE_INBOUND_PORTS, "9005"),
                ],
                "outrider.io/include-inbound-ports: 9005 is also in outrider.io/skip-inbound-ports",
            ),
        ] {
            let e = init_argv(&ann(pairs)).unwrap_err();
            assert_eq!(e.code, Code::BadAnnotations);
            assert!(e.msg.contains(needle), "{e}");
        }
    }

    #[test]
    fn the_plugin_programs_what_the_injector_would() {
        let pairs = [
            (ANN_SKIP_INBOUND_PORTS, "9000-9002,22"),
            (ANN_SKIP_OUTBOUND_PORTS, "5432"),
            (ANN_SKIP_OUTBOUND_CIDRS, "192.168.0.0/16"),
            (ANN_INCLUDE_OUTBOUND_CIDRS, "10.0.0.0/8"),
            (ANN_INCLUDE_INBOUND_PORTS, "8080,8443"),
            (ANN_INCLUDE_OUTBOUND_PORTS, "80,443,6000-6001"),
        ];
        let annotations: String = pairs
            .iter()
            .map(|(k, v)| format!("        {k}: \"{v}\"\n"))
            .collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n{}spec:\n  containers: [{{name: a, image: x}}]\n",
            annotations.replace("        ", "    ")
        );
        let out = outrider_kubernetes::inject::inject(&yaml, &Default::default()).unwrap();
        let docs = serde_norway::from_str::<serde_norway::Value>(&out.yaml).unwrap();
        let init = &docs["spec"]["initContainers"][0];
        assert_eq!(init["name"].as_str(), Some("outrider-init"));
        let args: Vec<String> = init["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(init_argv(&ann(&pairs)).unwrap(), args);
    }

    #[test]
    fn verdicts() {
        let pod = |pairs: &[(&str, &str)], host| {
            Fixed(Ok(Some(PodInfo {
                annotations: ann(pairs),
                host_network: host,
            })))
        };
        let k8s = env("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0");
        let meshed = pod(&[(ANN_INJECTED, "native")], false);
        assert!(matches!(
            verdict(&conf(), &k8s, &meshed).unwrap(),
            Verdict::Meshed(_)
        ));
        for (lookup, why) in [
            (pod(&[], false), "not meshed"),
            (pod(&[(ANN_INJECTED, "native")], true), "hostNetwork"),
            (
                pod(&[(ANN_INJECTED, "native"), (ANN_INJECT, "disabled")], false),
                "disabled",
            ),
        ] {
            match verdict(&conf(), &k8s, &lookup).unwrap() {
                Verdict::PassThrough(r) => assert!(r.contains(why), "{r}"),
                v => panic!("{v:?}"),
            }
        }
        let own = env("K8S_POD_NAMESPACE=outrider-system;K8S_POD_NAME=outrider-cni-x");
        let down = Fixed(Err(LookupError::Unreachable("x".into())));
        assert!(matches!(
            verdict(&conf(), &own, &down).unwrap(),
            Verdict::PassThrough(_)
        ));
        assert!(matches!(
            verdict(&conf(), &env(""), &down).unwrap(),
            Verdict::PassThrough(_)
        ));
        let e = verdict(&conf(), &k8s, &down).unwrap_err();
        assert_eq!(e.code, Code::TryAgainLater);
        assert!(e.msg.contains("within 3 s"), "{e}");
        assert_eq!(
            verdict(&conf(), &k8s, &Fixed(Ok(None))).unwrap_err().code,
            Code::TryAgainLater
        );
    }
}
