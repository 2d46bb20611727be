//! `outrider analyze --status`: what a live pod is waiting for, from its status as the API
//! server writes it (`kubectl get pod NAME -o yaml`), with its events when given beside it.
//!
//! The pod is walked in the order the kubelet starts it: scheduling, then each init container
//! in turn (an ordinary one must exit 0, a native sidecar must be running and past its startup
//! probe before the next starts), then the app containers (startup probe, readiness). The first
//! thing that blocks is reported with its reason, exit code, restart count and last
//! termination message, and the exact next command (`kubectl logs POD -c NAME -n NS
//! --previous`, `kubectl describe pod POD -n NS`); problems that do not block the start (an
//! OOM-killed sidecar that came back, a Job pod held by a legacy sidecar) are reported too. For
//! an injected pod the proxy's state is named. A document that is no pod status (a manifest
//! without `status`) is an [`InputError`], exit 2.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStatus, Event, Pod, PodSpec, PodStatus,
};
use serde_norway::Value;

use super::{Finding, Severity};
use crate::inject;
use crate::manifest::{self, typed, InputError, Location};

/// Every pod of `text` diagnosed; events in the same input are matched to their pods.
pub fn diagnose(text: &str) -> Result<Vec<Finding>, InputError> {
    let mut docs = manifest::parse(text)?;
    let mut pods: Vec<(Location, Pod)> = Vec::new();
    let mut events: Vec<Event> = Vec::new();
    manifest::for_each_object::<InputError>(&mut docs, |at, object| {
        match object.get("kind").and_then(Value::as_str) {
            Some("Pod") => pods.push((at.clone(), typed(object, at)?)),
            Some("Event") => events.push(typed(object, at)?),
            Some(_) => {}
            None => return Err(at.error("kind", "missing: expected a Pod, or Events")),
        }
        Ok(())
    })?;
    if pods.is_empty() {
        return Err(Location::new("input").error(
            "",
            "no Pod: give `kubectl get pod NAME -o yaml` (or -o json), optionally \
                with `kubectl get events -o json`",
        ));
    }
    let mut findings = Vec::new();
    for (at, pod) in &pods {
        findings.extend(Diagnosis::new(at, pod, &events)?.run());
    }
    Ok(findings)
}

/// One pod's walk.
struct Diagnosis<'a> {
    at: &'a Location,
    name: String,
    ns: String,
    spec: &'a PodSpec,
    status: &'a PodStatus,
    /// Warning events about this pod, by container (`""` for the pod itself), oldest first.
    events: BTreeMap<String, Vec<&'a Event>>,
    /// What `kubectl get pod` shows while the current init container runs (`Init:1/3`).
    shown: String,
    out: Vec<Finding>,
}

/// Where a container sits in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Init,
    Sidecar,
    App,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Init => "init container",
            Kind::Sidecar => "native sidecar",
            Kind::App => "container",
        }
    }
}

/// Whether the walk goes on to the next container.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Go,
    Stop,
}

const PULL_REASONS: [&str; 4] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
];

impl<'a> Diagnosis<'a> {
    fn new(at: &'a Location, pod: &'a Pod, events: &'a [Event]) -> Result<Self, InputError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(at.error("metadata.name", "missing: a pod has a name"));
        }
        let spec = pod
            .spec
            .as_ref()
            .ok_or_else(|| at.error("spec", "missing: a pod has a spec"))?;
        let status = pod
            .status
            .as_ref()
            .filter(|s| s.phase.is_some())
            .ok_or_else(|| {
                at.error(
                    "status",
                    "missing: this is a manifest, not a live pod (`kubectl get pod NAME -o \
                    yaml` has a status; for manifests use -f)",
                )
            })?;
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let mut by_container: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
        let mut mine: Vec<&Event> = events
            .iter()
            .filter(|e| {
                let o = &e.involved_object;
                o.kind.as_deref() == Some("Pod")
                    && o.name.as_deref() == Some(name.as_str())
                    && o.namespace.as_deref().is_none_or(|n| n == ns)
                    && e.type_.as_deref() == Some("Warning")
            })
            .collect();
        mine.sort_by_key(|e| e.last_timestamp.as_ref().map(|t| t.0));
        for e in mine {
            let field = e.involved_object.field_path.as_deref().unwrap_or_default();
            let container = field
                .split_once('{')
                .and_then(|(_, r)| r.strip_suffix('}'))
                .unwrap_or_default();
            by_container
                .entry(container.to_owned())
                .or_default()
                .push(e);
        }
        Ok(Diagnosis {
            at,
            name,
            ns,
            spec,
            status,
            events: by_container,
            shown: String::new(),
            out: Vec::new(),
        })
    }

    fn push(&mut self, severity: Severity, check: &'static str, path: String, texts: [String; 3]) {
        let [message, why, fix] = texts;
        self.out.push(Finding {
            severity,
            check,
            object: format!("Pod {}/{}", self.ns, self.name),
            document: self.at.to_string(),
            path,
            message,
            why,
            fix,
        });
    }

    fn kubectl(&self, what: &str) -> String {
        format!("kubectl {what} -n {}", self.ns)
    }

    fn describe(&self) -> String {
        self.kubectl(&format!("describe pod {}", self.name))
    }

    fn logs(&self, container: &str, extra: &str) -> String {
        format!(
            "kubectl logs {} -c {container} -n {}{extra}",
            self.name, self.ns
        )
    }

    /// The latest warning event about `container`, as ` (event Reason: message)`.
    fn event(&self, container: &str) -> String {
        match self.events.get(container).and_then(|v| v.last()) {
            Some(e) => format!(
                "; last event: {}: {}{}",
                e.reason.as_deref().unwrap_or("?"),
                e.message.as_deref().unwrap_or("").trim(),
                match e.count {
                    Some(n) if n > 1 => format!(" (x{n})"),
                    _ => String::new(),
                }
            ),
            None => String::new(),
        }
    }

    fn run(mut self) -> Vec<Finding> {
        if self.finished() == Next::Stop || self.unscheduled() == Next::Stop {
            return self.out;
        }
        let apps: Vec<Container> = self.spec.containers.clone();
        let statuses = self.status.container_statuses.clone().unwrap_or_default();
        if self.init_containers() == Next::Go {
            for (i, c) in apps.iter().enumerate() {
                let path = format!("status.containerStatuses[{}]", index(&statuses, &c.name));
                let Some(st) = statuses.iter().find(|s| s.name == c.name) else {
                    continue;
                };
                let position = format!("{} of {}", i + 1, apps.len());
                self.container(c, st, Kind::App, &path, &position);
            }
            self.job_held_by_sidecar(&apps, &statuses);
        }
        self.proxy_note();
        if self.out.iter().all(|f| f.severity == Severity::Info) {
            let phase = self.status.phase.clone().unwrap_or_default();
            let ready = statuses.iter().filter(|s| s.ready).count();
            let all = ready == apps.len() && phase == "Running";
            self.push(
                Severity::Info,
                if all { "pod-running" } else { "pod-waiting" },
                "status.phase".into(),
                [
                    format!(
                        "the pod is {phase}: {ready} of {} containers ready",
                        apps.len()
                    ),
                    if all {
                        "nothing is waiting".into()
                    } else {
                        "no container reports a problem yet: the kubelet is still setting the pod \
                            up"
                        .into()
                    },
                    self.describe(),
                ],
            );
        }
        self.out
    }

    /// A pod that has finished: Succeeded, or Failed as a whole (evicted, deadline exceeded).
    fn finished(&mut self) -> Next {
        let phase = self.status.phase.clone().unwrap_or_default();
        if phase == "Succeeded" {
            self.push(
                Severity::Info,
                "pod-succeeded",
                "status.phase".into(),
                [
                    "the pod ran to completion (phase Succeeded)".into(),
                    "every container exited 0".into(),
                    self.logs("CONTAINER", ""),
                ],
            );
            return Next::Stop;
        }
        let Some(reason) = self.status.reason.clone().filter(|_| phase == "Failed") else {
            return Next::Go;
        };
        let message = self.status.message.clone().unwrap_or_default();
        self.push(
            Severity::Error,
            "pod-failed",
            "status.reason".into(),
            [
                format!("the pod failed: {reason}{}", colon(message.trim())),
                match reason.as_str() {
                    "Evicted" => {
                        "the kubelet evicted it under node pressure (memory, disk): pods using \
                        more than they request go first; a workload's controller makes a new pod"
                            .into()
                    }
                    "DeadlineExceeded" => {
                        "it ran past `activeDeadlineSeconds`: every container was stopped".into()
                    }
                    _ => "the pod as a whole failed and will not be restarted".into(),
                },
                format!("{} (and the events of its node)", self.describe()),
            ],
        );
        Next::Stop
    }

    /// The init containers in order; `Stop` at the first that holds the rest back.
    fn init_containers(&mut self) -> Next {
        let inits: Vec<Container> = self.spec.init_containers.clone().unwrap_or_default();
        let total = inits.len();
        for (i, c) in inits.iter().enumerate() {
            let kind = if c.restart_policy.as_deref() == Some("Always") {
                Kind::Sidecar
            } else {
                Kind::Init
            };
            let statuses = self
                .status
                .init_container_statuses
                .as_deref()
                .unwrap_or_default();
            let path = format!("status.initContainerStatuses[{}]", index(statuses, &c.name));
            let st = statuses.iter().find(|s| s.name == c.name).cloned();
            let Some(st) = st else {
                self.push(
                    Severity::Warning,
                    "not-started",
                    format!("spec.initContainers[{i}]"),
                    [
                        format!(
                            "init container `{}` ({} of {total}) has no status yet",
                            c.name,
                            i + 1
                        ),
                        "the kubelet has not got to it: the pod is being set up (volumes, sandbox)"
                            .into(),
                        self.describe(),
                    ],
                );
                return Next::Stop;
            };
            let position = format!("{} of {total}", i + 1);
            self.shown = format!("Init:{i}/{total}");
            if self.container(c, &st, kind, &path, &position) == Next::Stop {
                return Next::Stop;
            }
        }
        Next::Go
    }

    /// `PodScheduled: False` stops the walk: no container has started.
    fn unscheduled(&mut self) -> Next {
        let cond = self
            .status
            .conditions
            .iter()
            .flatten()
            .enumerate()
            .find(|(_, c)| c.type_ == "PodScheduled" && c.status == "False")
            .map(|(i, c)| (i, c.reason.clone(), c.message.clone()));
        let Some((i, reason, message)) = cond else {
            return Next::Go;
        };
        self.push(
            Severity::Error,
            "unschedulable",
            format!("status.conditions[{i}]"),
            [
                format!(
                    "the pod is not scheduled: {}: {}",
                    reason.as_deref().unwrap_or("?"),
                    message.as_deref().unwrap_or("").trim()
                ),
                "no node has room for the pod's effective request (the larger of its init \
                and running phases, see `outrider resources`) or fits its selectors and \
                taints: no container starts"
                    .into(),
                format!(
                    "{} (the FailedScheduling event says which nodes were rejected and why)",
                    self.describe()
                ),
            ],
        );
        Next::Stop
    }

    /// One container's state; `Stop` when the containers after it cannot start.
    fn container(
        &mut self,
        c: &Container,
        st: &ContainerStatus,
        kind: Kind,
        path: &str,
        position: &str,
    ) -> Next {
        let name = c.name.as_str();
        let word = kind.word();
        let state = st.state.clone().unwrap_or_default();
        let restarts = st.restart_count;
        let last = st.last_state.as_ref().and_then(|s| s.terminated.as_ref());
        let last_text = last.map(|t| {
            let mut s = format!("exit code {}", t.exit_code);
            if let Some(r) = &t.reason {
                s.push_str(&format!(" ({r})"));
            }
            if let Some(m) = t
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
            {
                s.push_str(&format!(", message: {m}"));
            }
            s
        });
        let oom = last.is_some_and(|t| t.reason.as_deref() == Some("OOMKilled"))
            || state
                .terminated
                .as_ref()
                .is_some_and(|t| t.reason.as_deref() == Some("OOMKilled"));
        let blocks_start = kind != Kind::App;
        let event = self.event(name);
        if let Some(w) = &state.waiting {
            let reason = w.reason.as_deref().unwrap_or("Waiting");
            let detail = w.message.as_deref().map(str::trim).unwrap_or("");
            if PULL_REASONS.contains(&reason) {
                let image = c.image.as_deref().unwrap_or("?");
                self.push(Severity::Error, "image-pull", format!("{path}.state.waiting"), [
                    format!("{word} `{name}` ({position}) cannot pull image `{image}`: \
                        {reason}{}{event}", colon(detail)),
                    format!("the image name or tag is wrong, the registry is unreachable, or it needs \
                        an `imagePullSecret`; the kubelet retries with backoff up to 5 minutes{}", if blocks_start { ", and every container after it waits" } else { "" }),
                    format!("{} (the Failed event gives the registry's answer); check the image \
                        exists: `crane manifest {image}` or `docker pull {image}`", self.describe()),
                ]);
                return Next::Stop;
            }
            if reason == "CrashLoopBackOff" || (restarts > 0 && last.is_some()) {
                let (check, why) = if oom {
                    let limit = memory_limit(c);
                    (
                        "oom-killed",
                        format!(
                            "it was killed for using more memory than its limit ({limit}); the \
                        kubelet restarts it with a backoff doubling up to 5 minutes"
                        ),
                    )
                } else {
                    ("crash-loop", format!("it keeps exiting; the kubelet restarts it with a backoff doubling up to \
                        5 minutes{}", if blocks_start { ", and the pod does not get past it" } else { "" }))
                };
                self.push(Severity::Error, check, format!("{path}.lastState.terminated"), [
                    format!("{word} `{name}` ({position}) is crash-looping: {reason}, restarted \
                        {restarts} time(s), last {}{event}", last_text.clone().unwrap_or_else(|| "termination unknown".into())),
                    why,
                    if oom {
                        format!("{} (what it did before it was killed); raise `resources.limits.memory` \
                            of `{name}` (and its request)", self.logs(name, " --previous"))
                    } else {
                        format!("{} (the output of the run that failed)", self.logs(name, " --previous"))
                    },
                ]);
                return Next::Stop;
            }
            if reason == "PodInitializing" {
                // Waiting on the containers before it: reported there.
                return Next::Stop;
            }
            let check =
                if reason == "CreateContainerConfigError" || reason == "CreateContainerError" {
                    "config-error"
                } else {
                    "waiting"
                };
            let severity = if check == "config-error" {
                Severity::Error
            } else {
                Severity::Warning
            };
            self.push(
                severity,
                check,
                format!("{path}.state.waiting"),
                [
                    format!(
                        "{word} `{name}` ({position}) is waiting: {reason}{}{event}",
                        colon(detail)
                    ),
                    if check == "config-error" {
                        "the container cannot be created: a Secret, ConfigMap or key it \
                        references is missing, or its command is not found"
                            .into()
                    } else {
                        "the kubelet is still preparing it (volumes, image, sandbox)".into()
                    },
                    self.describe(),
                ],
            );
            return Next::Stop;
        }
        if let Some(t) = &state.terminated {
            let code = t.exit_code;
            if kind == Kind::Init && code == 0 {
                return Next::Go;
            }
            if kind == Kind::App {
                // A finished app container is handled with the pod (a Job held by a sidecar).
                if code == 0 {
                    return Next::Go;
                }
            }
            let reason = t.reason.as_deref().unwrap_or("Error");
            let msg = t.message.as_deref().map(str::trim).unwrap_or("");
            let check = if reason == "OOMKilled" {
                "oom-killed"
            } else {
                "failed"
            };
            self.push(Severity::Error, check, format!("{path}.state.terminated"), [
                format!("{word} `{name}` ({position}) exited with code {code} ({reason}){}{event}", if msg.is_empty() { String::new() } else { format!(", message: {msg}") }),
                match self.spec.restart_policy.as_deref() {
                    Some("Never") => "the pod's restartPolicy is Never: it will not be retried, the pod fails".into(),
                    _ => "the kubelet will restart it with backoff".into(),
                },
                format!("{} (its output)", self.logs(name, "")),
            ]);
            return Next::Stop;
        }
        if state.running.is_some() {
            if oom {
                self.push(Severity::Error, "oom-killed", format!("{path}.lastState.terminated"), [
                    format!("{word} `{name}` is running again, but was OOM-killed before: restarted \
                        {restarts} time(s), last {}", last_text.clone().unwrap_or_default()),
                    format!("its memory limit ({}) is below what it uses; each kill loses its work in \
                        flight{}", memory_limit(c), if kind == Kind::Sidecar || name == inject::PROXY_NAME { " and, for a sidecar, the app's logs, secrets or network with it" } else { "" }),
                    format!("{}; raise `resources.limits.memory` of `{name}` (and its request)", self.logs(name, " --previous")),
                ]);
            }
            if !oom && kind != Kind::Init && restarts > 0 {
                if let Some(l) = &last_text {
                    self.push(Severity::Warning, "restarted", format!("{path}.lastState.terminated"), [
                        format!("{word} `{name}` is running, but has restarted {restarts} time(s), last \
                            {l}{event}"),
                        "a container that restarts loses its work in flight; exit code 137 without \
                            OOMKilled is a kill from outside (a failed liveness probe, a stop)".into(),
                        format!("{} (the run before the restart); {} (Unhealthy events)",
                            self.logs(name, " --previous"), self.describe()),
                    ]);
                }
            }
            match kind {
                Kind::Init => {
                    let earlier = match &last_text {
                        Some(l) => format!(" (restarted {restarts} time(s), last {l})"),
                        None => String::new(),
                    };
                    self.push(Severity::Warning, "init-running", format!("{path}.state.running"), [
                        format!("init container `{name}` ({position}) is running{earlier}; the pod (`{}` \
                            in `kubectl get pods`) waits for it to exit 0", self.shown),
                        format!("init containers run one at a time: what comes after `{name}` (and the \
                            app) starts only when it has finished; a wait for a dependency that \
                            never comes holds the pod here forever"),
                        format!("{} (what it is doing now)", self.logs(name, " -f")),
                    ]);
                    Next::Stop
                }
                Kind::Sidecar => {
                    if st.started == Some(false) {
                        let probe = if c.startup_probe.is_some() {
                            "its startup probe has not passed yet"
                        } else {
                            "it has not started yet"
                        };
                        self.push(Severity::Warning, "sidecar-not-started", format!("{path}.started"), [
                            format!("native sidecar `{name}` ({position}) is running but not started: \
                                {probe}{event}"),
                            "the containers after a native sidecar start only once it has started \
                                (its startup probe passed): the app waits for it".into(),
                            format!("{} (probe failures are in the events); {}", self.describe(), self.logs(name, "")),
                        ]);
                        return Next::Stop;
                    }
                    if !st.ready {
                        self.push(Severity::Warning, "sidecar-not-ready", format!("{path}.ready"), [
                            format!("native sidecar `{name}` ({position}) is running but not ready{event}"),
                            "it does not hold back the containers after it, but the pod is not Ready \
                                (no traffic from Services) until it is".into(),
                            format!("{}; {}", self.describe(), self.logs(name, "")),
                        ]);
                    }
                    Next::Go
                }
                Kind::App => {
                    if st.started == Some(false) && c.startup_probe.is_some() {
                        self.push(Severity::Warning, "startup-probe", format!("{path}.started"), [
                            format!("container `{name}` is running but its startup probe has not \
                                passed{}{event}", if restarts > 0 { format!(" (restarted {restarts} time(s))") } else { String::new() }),
                            "until the startup probe passes, liveness and readiness are not checked \
                                and the pod is not Ready; when it fails `failureThreshold` times the \
                                kubelet kills and restarts the container".into(),
                            format!("{} (the Unhealthy events show the probe's answer); {}", self.describe(), self.logs(name, "")),
                        ]);
                        return Next::Stop;
                    }
                    if !st.ready {
                        self.push(Severity::Warning, "not-ready", format!("{path}.ready"), [
                            format!("container `{name}` is running but not ready{event}"),
                            "its readiness probe fails: the pod gets no traffic from its Services".into(),
                            format!("{} (the Unhealthy events show the probe's answer)", self.describe()),
                        ]);
                        return Next::Stop;
                    }
                    Next::Go
                }
            }
        } else {
            Next::Go
        }
    }

    /// An app container finished while a regular-container sidecar keeps the pod running: the
    /// Job never completes.
    fn job_held_by_sidecar(&mut self, apps: &[Container], statuses: &[ContainerStatus]) {
        let state = |name: &str| -> Option<ContainerState> {
            statuses.iter().find(|s| s.name == name)?.state.clone()
        };
        let done: Vec<&Container> = apps
            .iter()
            .filter(|c| {
                state(&c.name)
                    .and_then(|s| s.terminated)
                    .is_some_and(|t| t.exit_code == 0)
            })
            .collect();
        let running: Vec<(usize, &Container)> = apps
            .iter()
            .enumerate()
            .filter(|(_, c)| state(&c.name).is_some_and(|s| s.running.is_some()))
            .collect();
        if done.is_empty()
            || running.is_empty()
            || self.spec.restart_policy.as_deref() == Some("Always")
        {
            return;
        }
        let done_names: Vec<String> = done.iter().map(|c| format!("`{}`", c.name)).collect();
        for (_, c) in running {
            let path = format!("status.containerStatuses[{}]", index(statuses, &c.name));
            self.push(
                Severity::Error,
                "job-legacy-sidecar",
                format!("{path}.state.running"),
                [
                    format!(
                        "{} completed, but `{}` is still running: the pod cannot complete",
                        done_names.join(", "),
                        c.name
                    ),
                    "a pod that runs to completion (a Job's) finishes only when every \
                    container in `containers` has exited; a sidecar there never does, so the \
                    Job never completes"
                        .into(),
                    format!(
                        "make `{}` a native sidecar (`initContainers` with `restartPolicy: \
                    Always`, Kubernetes 1.29+; `outrider analyze -f` on the Job shows \
                    where); to free this pod now: `kubectl delete pod {} -n {}`",
                        c.name, self.name, self.ns
                    ),
                ],
            );
        }
    }

    /// For an injected pod whose proxy is not ready: what the proxy waits for.
    fn proxy_note(&mut self) {
        let statuses = self
            .status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(self.status.container_statuses.iter().flatten());
        let Some(st) = statuses
            .into_iter()
            .find(|s| s.name == inject::PROXY_NAME)
            .cloned()
        else {
            return;
        };
        if st.ready || st.state.as_ref().is_none_or(|s| s.running.is_none()) {
            return;
        }
        self.push(
            Severity::Warning,
            "proxy-not-ready",
            "status".into(),
            [
                format!(
                    "the Outrider proxy `{}` is running but not ready{}",
                    inject::PROXY_NAME,
                    self.event(inject::PROXY_NAME)
                ),
                "its /ready answers 503 until it has its first certificate (the control \
                plane accepted its token) and the first view from the control plane: \
                either the control plane is unreachable, or it refuses the proxy's token"
                    .into(),
                format!(
                    "{}; or `kubectl port-forward pod/{} 15020 -n {}` and `outrider analyze \
                --status FILE --admin http://127.0.0.1:15020`",
                    self.logs(inject::PROXY_NAME, ""),
                    self.name,
                    self.ns
                ),
            ],
        );
    }
}

fn colon(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

fn index(statuses: &[ContainerStatus], name: &str) -> usize {
    statuses.iter().position(|s| s.name == name).unwrap_or(0)
}

fn memory_limit(c: &Container) -> String {
    c.resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .map_or_else(|| "none set: the node's memory".into(), |q| q.0.clone())
}
