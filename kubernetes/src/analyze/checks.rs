//! The static checks of `outrider analyze -f`: what in a workload's pod template will keep its
//! pods from starting, from completing, or from working in a meshed pod.
//!
//! The input is read by [`crate::manifest`] (the reader `outrider inject` uses) and each
//! workload is checked against the `k8s-openapi` types first, so a malformed manifest is an
//! [`InputError`] (exit 2), never a finding. The resource figures come from
//! [`crate::resources::report`], the same computation `outrider resources` prints. Services in
//! the same input are collected first: they tell a bare name in another namespace from one
//! that is simply not in the input.
//!
//! Checks (the `check` name of each [`Finding`]):
//!
//! | check | severity | what |
//! |---|---|---|
//! | `wait-without-dns-check` | warning | a shell loop waits for a host with `nc`/`curl`/`wget`/... and never resolves it first |
//! | `wait-without-timeout` | warning | a shell wait loop with no bound |
//! | `wait-passes-through-proxy` | error | a wait the proxy answers itself: `nc`, `curl` without `-f` |
//! | `wait-target-namespace` | error | a bare name whose Service is in another namespace of the input |
//! | `wait-bad-target` | error | an `outrider wait` target that `outrider wait` refuses (exit 2) |
//! | `job-legacy-sidecar` | error | a long-running container in `containers` of a Job or CronJob |
//! | `native-sidecar-version` | info, or error below 1.29 | `initContainers` with `restartPolicy: Always` |
//! | `sidecar-after-dependent-init` | error | an init container uses a native sidecar that starts after it |
//! | `no-requests` | warning (sidecars), info | no CPU or memory request |
//! | `limit-below-request` | error | a limit under its request (the API server refuses the pod) |
//! | `pod-resources` | info | the pod's effective request and QoS class, and with the proxy injected |
//! | `inject-refused` | error | a field `outrider inject` refuses (it would write nothing) |
//! | `tcp-probe-meshed` | warning | a TCP probe: the proxy accepts every connection, so it always passes |
//! | `probe-on-proxy-port` | error | a probe on 15001/15006/15020 that is not the injector's |
//! | `port-collision` | error | a container port the proxy owns |
//! | `host-network` | warning | `hostNetwork: true`: the pod cannot be meshed |
//! | `migration-init` | warning | an init container running the app's image to migrate a schema, with no deadline |
//! | `secret-in-env` | info | a Secret read into an environment variable: a rotation needs a restart |

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use outrider_iptables_init::ports;
use serde_norway::Value;

use super::{Finding, Severity};
use crate::inject::{self, InjectOptions};
use crate::manifest::{self, InputError, Location, Workload, WorkloadKind};
use crate::resources::{self, Role};

/// What the checks need to know beyond the manifests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// The cluster's Kubernetes version (major, minor), when known.
    pub kubernetes_version: Option<(u32, u32)>,
}

/// The ports the proxy listens on in every meshed pod.
const PROXY_PORTS: [u16; 3] = [ports::INBOUND, ports::OUTBOUND, ports::ADMIN];

/// Every finding for every workload of `text`, in input order.
pub fn analyze(text: &str, opts: &Options) -> Result<Vec<Finding>, InputError> {
    let mut docs = manifest::parse(text)?;
    // Services first: a bare name is only known to be in another namespace if the input says so.
    let mut services: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    manifest::for_each_object::<InputError>(&mut docs, |_, object| {
        if object.get("kind").and_then(Value::as_str) == Some("Service") {
            let meta = object.get("metadata");
            let field = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
            if let Some(name) = field("name") {
                let ns = field("namespace").unwrap_or("default");
                services
                    .entry(name.to_owned())
                    .or_default()
                    .insert(ns.to_owned());
            }
        }
        Ok(())
    })?;
    let mut findings = Vec::new();
    manifest::for_each_object(&mut docs, |at, object| {
        let Some(kind) = WorkloadKind::of(object) else {
            return Ok(());
        };
        let w = Workload::check(kind, object, at)?;
        let report = resources::report(&w, at)?;
        let mut pod = Pod {
            w: &w,
            at,
            raw: object,
            object: report.workload.clone(),
            pfx: format!("{}spec", manifest::prefix(kind)),
            services: &services,
            opts,
            out: &mut findings,
        };
        // The figures with the proxy, as `outrider resources --with-proxy` computes them, for
        // a pod the injector would change.
        let with_proxy = (pod.is_meshed() && !inject::is_injected(&w.pod)).then(|| {
            let mut one = [object.clone()];
            inject::inject_docs(&mut one, &InjectOptions::default(), &mut Vec::new())
                .and_then(|()| resources::report(&Workload::check(kind, &one[0], at)?, at))
        });
        pod.check(&report, with_proxy);
        Ok::<(), InputError>(())
    })?;
    Ok(findings)
}

/// One workload under check, and where its findings go.
struct Pod<'a> {
    w: &'a Workload,
    at: &'a Location,
    raw: &'a Value,
    object: String,
    /// `spec.template.spec` (or `spec` for a Pod).
    pfx: String,
    services: &'a BTreeMap<String, BTreeSet<String>>,
    opts: &'a Options,
    out: &'a mut Vec<Finding>,
}

impl Pod<'_> {
    fn push(&mut self, severity: Severity, check: &'static str, path: String, texts: [String; 3]) {
        let [message, why, fix] = texts;
        self.out.push(Finding {
            severity,
            check,
            object: self.object.clone(),
            document: self.at.to_string(),
            path,
            message,
            why,
            fix,
        });
    }

    fn namespace(&self) -> &str {
        self.w.namespace.as_deref().unwrap_or("default")
    }

    /// Every container (copied, so findings can be pushed while iterating) with its role and
    /// field path, init containers first.
    fn slots(&self) -> Vec<(Container, Role, String)> {
        let mut slots = Vec::new();
        for (i, c) in self.w.pod.init_containers.iter().flatten().enumerate() {
            let role = if is_native_sidecar(c) {
                Role::Sidecar
            } else {
                Role::Init
            };
            slots.push((c.clone(), role, format!("{}.initContainers[{i}]", self.pfx)));
        }
        for (i, c) in self.w.pod.containers.iter().enumerate() {
            slots.push((
                c.clone(),
                Role::App,
                format!("{}.containers[{i}]", self.pfx),
            ));
        }
        slots
    }

    /// Whether the mesh is (or will be, by `outrider inject`) in this pod.
    fn is_meshed(&self) -> bool {
        if inject::is_injected(&self.w.pod) {
            return true;
        }
        let ann = template_annotation(self.raw, self.w.kind, inject::ANN_INJECT);
        ann.as_deref() != Some("disabled") && self.w.pod.host_network != Some(true)
    }

    fn check(
        &mut self,
        report: &resources::Report,
        with_proxy: Option<Result<resources::Report, InputError>>,
    ) {
        let slots = self.slots();
        let first = self.out.len();
        let proxy_first = self.proxy_first();
        for (i, (c, role, path)) in slots.iter().enumerate() {
            if *role == Role::Init {
                self.wait_checks(c, path, proxy_first.is_some_and(|first| i >= first));
            }
        }
        self.sidecar_checks(&slots);
        self.resource_checks(&slots, report, with_proxy);
        self.mesh_checks(&slots);
        self.migration_and_secret_checks(&slots);
        // Errors first, then warnings, then infos; in field order within each.
        self.out[first..].sort_by_key(|f| std::cmp::Reverse(f.severity));
    }

    // ---- init containers that wait --------------------------------------------------------

    /// The first init container that runs with the proxy already up: the one after the native
    /// sidecar `outrider-proxy` of an injected pod, or the first of all when `outrider inject`
    /// would inject the pod (it puts the proxy before the app's init containers). `None` when
    /// no init container runs behind the proxy (not meshed, or the legacy form).
    fn proxy_first(&self) -> Option<usize> {
        if inject::is_injected(&self.w.pod) {
            let inits = self.w.pod.init_containers.as_deref().unwrap_or_default();
            inits
                .iter()
                .position(|c| c.name == inject::PROXY_NAME && is_native_sidecar(c))
                .map(|p| p + 1)
        } else if self.is_meshed() {
            Some(0)
        } else {
            None
        }
    }

    fn wait_checks(&mut self, c: &Container, path: &str, behind_proxy: bool) {
        if is_outrider(c) {
            self.outrider_wait_checks(c, path, behind_proxy);
            return;
        }
        let script = with_env(c, &script(c));
        let words = words(&script);
        let tool = words
            .iter()
            .find(|w| WAIT_TOOLS.contains(&w.as_str()) || DNS_TOOLS.contains(&w.as_str()))
            .cloned();
        let looping = words
            .iter()
            .any(|w| w == "until" || w == "while" || w == "for");
        let Some(tool) = tool else {
            return;
        };
        if !looping {
            return;
        }
        let hosts = hosts(&words);
        let name = &c.name;
        if behind_proxy {
            self.through_proxy(c, path, &tool, &words, &hosts);
        }
        let field = script_field(c);
        let checks_dns = words.iter().any(|w| DNS_TOOLS.contains(&w.as_str()));
        // `timeout`, a counted `for i in ...` loop, or a counter compared in the loop.
        let counted = words.windows(3).any(|w| w[0] == "for" && w[2] == "in");
        let bounded = counted
            || words
                .iter()
                .any(|w| ["timeout", "seq", "-gt", "-ge", "-lt", "-le"].contains(&w.as_str()))
            || self.w.pod.active_deadline_seconds.is_some();
        let what = match hosts.first() {
            Some(h) => format!("`{h}`"),
            None => "a dependency".to_owned(),
        };
        if !checks_dns && !hosts.is_empty() {
            self.push(
                Severity::Warning,
                "wait-without-dns-check",
                format!("{path}.{field}"),
                [
                    format!(
                        "init container `{name}` waits for {what} in a loop of `{tool}`, which \
                        never checks that the name resolves"
                    ),
                    "a name that does not resolve (a Service in another namespace, a typo, \
                        cluster DNS not up yet) fails the same way as a dependency that is down: \
                        the loop spins and the pod stays in Init with nothing in its status to \
                        say why"
                        .to_owned(),
                    format!(
                        "use `outrider wait --tcp {}` (it resolves the name first and says when \
                        it does not), or resolve with `nslookup` before the loop",
                        hosts
                            .first()
                            .map_or("HOST:PORT".to_owned(), |h| format!("{h}:PORT"))
                    ),
                ],
            );
        }
        if !bounded {
            self.push(
                Severity::Warning,
                "wait-without-timeout",
                format!("{path}.{field}"),
                [
                    format!("init container `{name}` waits for {what} in a loop with no timeout"),
                    "when the dependency never comes the pod waits forever in `Init:N/M`, \
                        never restarts, and nothing fails loudly enough to alert"
                        .to_owned(),
                    "bound the wait: `outrider wait ... --timeout 5m` exits 1 naming what is \
                        unreachable (the kubelet then restarts it with backoff, visible as \
                        CrashLoopBackOff), or wrap the loop in `timeout 300 sh -c '...'`"
                        .to_owned(),
                ],
            );
        }
        for h in &hosts {
            self.namespace_check(h, &format!("{path}.{field}"), name);
        }
    }

    /// A check that the proxy answers in place of the dependency: a bare TCP connect, or an
    /// HTTP request that takes the proxy's 502/503 for an answer.
    fn through_proxy(
        &mut self,
        c: &Container,
        path: &str,
        tool: &str,
        words: &[String],
        hosts: &[String],
    ) {
        let connect_only = ["nc", "ncat", "netcat", "telnet"].contains(&tool);
        let fails_on_5xx = words.iter().any(|w| {
            w == "--fail"
                || w == "--fail-with-body"
                || (w.starts_with('-') && !w.starts_with("--") && w.contains('f'))
        });
        let lenient_curl = tool == "curl" && !fails_on_5xx;
        if !connect_only && !lenient_curl {
            return;
        }
        let what = match hosts.first() {
            Some(h) => format!("`{h}`"),
            None => "its dependency".to_owned(),
        };
        let field = script_field(c);
        let (how, fix) = if connect_only {
            (
                format!("with a bare TCP connect (`{tool}`)"),
                "use `outrider wait --tcp HOST:PORT` (it keeps the connection open for \
                    `--settle`, and the proxy closes it when the target is unreachable), or a \
                    check the dependency itself answers (`pg_isready`, `redis-cli ping`)",
            )
        } else {
            (
                "with `curl` without `-f`".to_owned(),
                "add `-f` (`--fail`): curl then exits non-zero on a 5xx; or use `outrider wait \
                    --http URL` (2xx only)",
            )
        };
        self.push(
            Severity::Error,
            "wait-passes-through-proxy",
            format!("{path}.{field}"),
            [
                format!(
                    "init container `{}` checks {what} {how}, which the Outrider proxy answers \
                        for every destination",
                    c.name
                ),
                "in a meshed pod the proxy starts before this init container and iptables \
                    sends its connections to the proxy, which accepts them at once (and answers \
                    HTTP with 502/503 when the target is down): the wait passes while the \
                    dependency is down"
                    .to_owned(),
                fix.to_owned(),
            ],
        );
    }

    fn outrider_wait_checks(&mut self, c: &Container, path: &str, behind_proxy: bool) {
        let argv: Vec<&str> = c
            .command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .map(String::as_str)
            .collect();
        let Some(start) = argv.iter().position(|a| *a == "wait") else {
            return;
        };
        let field = script_field(c);
        let mut it = argv[start + 1..].iter();
        let (mut tcp, mut no_settle) = (None, false);
        while let Some(flag) = it.next() {
            let (flag, value): (&str, Option<&str>) = match flag.split_once('=') {
                Some((f, v)) => (f, Some(v)),
                None => (flag, None),
            };
            if flag != "--tcp" && flag != "--http" && flag != "--settle" {
                continue;
            }
            let Some(value) = value.or_else(|| it.next().copied()) else {
                continue;
            };
            if flag == "--settle" {
                no_settle = outrider_control::duration::parse(value).is_ok_and(|d| d.is_zero());
                continue;
            }
            if flag == "--tcp" {
                tcp = Some(value);
            }
            let host = if flag == "--tcp" {
                crate::wait::parse_host_port(value).map(|hp| hp.host)
            } else {
                crate::wait::parse_http_url(value).map(|u| u.host().unwrap_or_default().to_owned())
            };
            match host {
                Ok(host) => self.namespace_check(&host, &format!("{path}.{field}"), &c.name),
                Err(e) => self.push(
                    Severity::Error,
                    "wait-bad-target",
                    format!("{path}.{field}"),
                    [
                        format!("init container `{}`: {flag} {e}", c.name),
                        "`outrider wait` refuses it and exits 2: the init container crash-loops \
                            and the pod never starts"
                            .to_owned(),
                        "write the target as HOST:PORT (`--tcp postgres-service.db:5432`) or \
                            http://HOST[:PORT]/PATH (`--http`)"
                            .to_owned(),
                    ],
                ),
            }
        }
        if let Some(target) = tcp.filter(|_| behind_proxy && no_settle) {
            self.push(
                Severity::Error,
                "wait-passes-through-proxy",
                format!("{path}.{field}"),
                [
                    format!(
                        "init container `{}` waits for `{target}` with `--settle 0`, a bare TCP \
                            connect that the Outrider proxy answers for every destination",
                        c.name
                    ),
                    "in a meshed pod the proxy starts before this init container and accepts \
                        every connection at once: without --settle the wait passes while the \
                        dependency is down"
                        .to_owned(),
                    "drop `--settle 0` (the default 500ms holds the connection until the proxy \
                        closes it when the target is unreachable)"
                        .to_owned(),
                ],
            );
        }
    }

    /// A bare `host` with no Service of that name in the pod's namespace, but one in another
    /// namespace of the input.
    fn namespace_check(&mut self, host: &str, path: &str, container: &str) {
        if host.contains('.') || host.parse::<std::net::IpAddr>().is_ok() || host == "localhost" {
            return;
        }
        let Some(namespaces) = self.services.get(host) else {
            return;
        };
        let ns = self.namespace().to_owned();
        if namespaces.contains(&ns) {
            return;
        }
        let others: Vec<&str> = namespaces.iter().map(String::as_str).collect();
        let other = others.first().copied().unwrap_or_default();
        self.push(
            Severity::Error,
            "wait-target-namespace",
            path.to_owned(),
            [
                format!(
                    "init container `{container}` waits for `{host}`, a Service in namespace \
                    `{}`, but the pod runs in `{ns}`",
                    others.join("`, `")
                ),
                format!(
                    "a bare name resolves in the pod's own namespace only \
                    (`{host}.{ns}.svc.cluster.local`): it never resolves and the pod stays \
                    in Init"
                ),
                format!("write `{host}.{other}` (or `{host}.{other}.svc.cluster.local`)"),
            ],
        );
    }

    // ---- sidecars ---------------------------------------------------------------------------

    fn sidecar_checks(&mut self, slots: &[(Container, Role, String)]) {
        let kind = self.w.kind;
        // Legacy sidecars in a Job: the pod completes only when every container has exited.
        if kind.runs_to_completion() && self.w.pod.containers.len() > 1 {
            for (c, role, path) in slots {
                if *role == Role::App && is_long_running(c) {
                    self.push(
                        Severity::Error,
                        "job-legacy-sidecar",
                        path.clone(),
                        [
                            format!("`{}` runs beside the {kind:?}'s work in `containers` and does not exit \
                                by itself", c.name),
                            "a Job's pod completes only when all of its containers have exited: the \
                                work finishes, this container keeps running, and the Job never completes \
                                (nor does the next CronJob run, with `concurrencyPolicy: Forbid`)".to_owned(),
                            format!("make `{}` a native sidecar: move it to `initContainers` with \
                                `restartPolicy: Always` (Kubernetes 1.29+); the kubelet stops it when \
                                the work is done", c.name),
                        ],
                    );
                }
            }
        }
        // Native sidecars and the cluster version.
        let natives: Vec<&(Container, Role, String)> =
            slots.iter().filter(|s| s.1 == Role::Sidecar).collect();
        if let Some(first) = natives.first() {
            let names: Vec<&str> = natives.iter().map(|s| s.0.name.as_str()).collect();
            let message = format!(
                "native sidecar(s) `{}` (`initContainers` with `restartPolicy: Always`) \
                    need Kubernetes 1.29 or newer",
                names.join("`, `")
            );
            let why = "before 1.29 (1.28 without the SidecarContainers feature gate) the API \
                server refuses `restartPolicy` on an init container or drops it: the \
                sidecar then runs as an ordinary init container that never exits, and \
                the pod stays in `Init:1/N` forever"
                .to_owned();
            let fix = "run on 1.29+; for older clusters use `outrider inject --legacy-sidecar` \
                (the proxy as a regular container)"
                .to_owned();
            match self.opts.kubernetes_version {
                Some(v) if v < (1, 29) => self.push(
                    Severity::Error,
                    "native-sidecar-version",
                    first.2.clone(),
                    [
                        format!("{message}; the cluster runs {}.{}", v.0, v.1),
                        why,
                        fix,
                    ],
                ),
                Some(_) => {}
                None => self.push(
                    Severity::Info,
                    "native-sidecar-version",
                    first.2.clone(),
                    [
                        message,
                        why,
                        format!("{fix} (pass --kubernetes-version to check)"),
                    ],
                ),
            }
        }
        // A native sidecar after an ordinary init container that uses it.
        for (i, (init, role, path)) in slots.iter().enumerate() {
            if *role != Role::Init {
                continue;
            }
            for (sidecar, srole, spath) in &slots[i + 1..] {
                if *srole != Role::Sidecar {
                    continue;
                }
                if let Some(how) = uses(init, sidecar) {
                    self.push(
                        Severity::Error,
                        "sidecar-after-dependent-init",
                        path.clone(),
                        [
                            format!("init container `{}` {how} native sidecar `{}`, which starts after it \
                                ({spath})", init.name, sidecar.name),
                            "init containers and native sidecars start one at a time in the order \
                                written: the sidecar is not running yet when this init container needs \
                                it, so it fails or waits forever".to_owned(),
                            format!("move `{}` above `{}` in `initContainers`", sidecar.name, init.name),
                        ],
                    );
                }
            }
        }
    }

    // ---- resources --------------------------------------------------------------------------

    fn resource_checks(
        &mut self,
        slots: &[(Container, Role, String)],
        report: &resources::Report,
        with_proxy: Option<Result<resources::Report, InputError>>,
    ) {
        let several = self.w.pod.containers.len() > 1;
        for ((c, role, path), row) in slots.iter().zip(&report.rows) {
            let missing: Vec<&str> = resources::RESOURCES
                .iter()
                .zip(&row.requests)
                .filter(|(_, q)| q.is_none())
                .map(|(r, _)| if *r == "cpu" { "CPU" } else { "memory" })
                .collect();
            let sidecar = *role == Role::Sidecar
                || (*role == Role::App && several && !path.ends_with("[0]") && is_sidecar_name(c));
            if !missing.is_empty() {
                let what = if sidecar { "sidecar" } else { "container" };
                self.push(
                    if sidecar { Severity::Warning } else { Severity::Info },
                    "no-requests",
                    format!("{path}.resources"),
                    [
                        format!("{what} `{}` has no {} request", c.name, missing.join(" or ")),
                        format!("the scheduler counts 0 for it, so the node may have no room for what it \
                            really uses; without a memory request it is the first to be OOM-killed \
                            or evicted under pressure{}", if sidecar { ", and a killed sidecar takes the app's logs, secrets or network with it" } else { "" }),
                        format!("set `resources.requests` ({} at what it uses under load; `kubectl top \
                            pod --containers` shows it)", missing.join(" and ")),
                    ],
                );
            }
            for (r, (req, lim)) in resources::RESOURCES
                .iter()
                .zip(row.requests.iter().zip(&row.limits))
            {
                let (Some(req), Some(lim)) = (req, lim) else {
                    continue;
                };
                if lim < req {
                    let show = |q: crate::quantity::Quantity| {
                        if *r == "cpu" {
                            q.cpu()
                        } else {
                            q.memory()
                        }
                    };
                    self.push(
                        Severity::Error,
                        "limit-below-request",
                        format!("{path}.resources.limits.{r}"),
                        [
                            format!(
                                "`{}` has a {r} limit of {} below its request of {}",
                                c.name,
                                show(*lim),
                                show(*req)
                            ),
                            "the API server refuses the pod (`must be less than or equal to ... \
                                limit`): the workload's controller creates no pod at all"
                                .to_owned(),
                            format!(
                                "raise the {r} limit to at least the request, or lower the request"
                            ),
                        ],
                    );
                }
            }
        }
        let qos = qos_class(&report.rows);
        let pair = |q: [crate::quantity::Quantity; 2]| {
            format!("cpu {}, memory {}", q[0].cpu(), q[1].memory())
        };
        self.push(
            Severity::Info,
            "pod-resources",
            self.pfx.clone(),
            [
                format!(
                    "the pod requests {} (init max {}; app containers and sidecars {}); QoS \
                    class {qos}{}",
                    pair(report.pod),
                    pair(report.init_max),
                    pair(report.app_sum),
                    match &with_proxy {
                        Some(Ok(r)) => format!(
                            "; with the Outrider proxy injected: {}, QoS class {}",
                            pair(r.pod),
                            qos_class(&r.rows)
                        ),
                        _ => String::new(),
                    }
                ),
                format!(
                    "the scheduler places the pod by the larger of its init and running \
                    phases; {}",
                    match qos {
                        "Guaranteed" => "Guaranteed pods are the last to be evicted",
                        "BestEffort" =>
                            "BestEffort pods are the first to be evicted under node pressure",
                        _ =>
                            "Burstable pods are evicted after BestEffort ones, by how far they use \
                        more than they request",
                    }
                ),
                "`outrider resources -f FILE --with-proxy` shows the figures per \
                    container"
                    .to_owned(),
            ],
        );
        if let Some(Err(e)) = with_proxy {
            self.push(
                Severity::Error,
                "inject-refused",
                e.path.clone(),
                [
                    format!("`outrider inject` refuses this workload: {}", e.message),
                    "the injector stops at the first bad field and writes nothing (exit 2): \
                        no workload of the file is meshed"
                        .to_owned(),
                    "correct the field (the proxy's annotations are listed in docs/inject.md)"
                        .to_owned(),
                ],
            );
        }
    }

    // ---- the mesh ---------------------------------------------------------------------------

    fn mesh_checks(&mut self, slots: &[(Container, Role, String)]) {
        if self.w.pod.host_network == Some(true) {
            let ann = template_annotation(self.raw, self.w.kind, inject::ANN_INJECT);
            if ann.as_deref() != Some("disabled") {
                self.push(
                    Severity::Warning,
                    "host-network",
                    format!("{}.hostNetwork", self.pfx),
                    [
                        "`hostNetwork: true`: the pod shares the node's network, so the mesh \
                            cannot be added (`outrider inject` skips it)".to_owned(),
                        "its calls to meshed services arrive as plaintext from the node's \
                            address: a port with `default_policy: deny` or `plaintext: false` \
                            refuses them, and its own ports get no mTLS".to_owned(),
                        format!("drop `hostNetwork` if the pod does not need the node's network; \
                            otherwise annotate it `{}: disabled` and allow its node addresses in the \
                            policy of the services it calls", inject::ANN_INJECT),
                    ],
                );
            }
            return;
        }
        if !self.is_meshed() {
            return;
        }
        for (c, _, path) in slots {
            if c.name == inject::PROXY_NAME || c.name == inject::INIT_NAME {
                continue;
            }
            for (j, p) in c.ports.iter().flatten().enumerate() {
                if let Some(port) = proxy_port(p.container_port) {
                    self.push(
                        Severity::Error,
                        "port-collision",
                        format!("{path}.ports[{j}].containerPort"),
                        [
                            format!("`{}` listens on {port}, a port of the Outrider proxy", c.name),
                            format!("the proxy owns {} (inbound, outbound, admin) in every meshed pod: one of \
                                the two fails to bind, and traffic to it is captured by iptables", join_ports()),
                            "move the container to another port".to_owned(),
                        ],
                    );
                }
            }
            for (kind, probe) in [
                ("startupProbe", &c.startup_probe),
                ("livenessProbe", &c.liveness_probe),
                ("readinessProbe", &c.readiness_probe),
            ] {
                let Some(probe) = probe else { continue };
                self.probe_check(c, probe, &format!("{path}.{kind}"));
            }
        }
    }

    fn probe_check(&mut self, c: &Container, probe: &Probe, path: &str) {
        if let Some(tcp) = &probe.tcp_socket {
            let port = resolve_port(c, &tcp.port);
            if let Some(p) = port.and_then(proxy_port) {
                self.probe_on_proxy_port(c, p, &format!("{path}.tcpSocket.port"));
                return;
            }
            self.push(
                Severity::Warning,
                "tcp-probe-meshed",
                format!("{path}.tcpSocket"),
                [
                    format!("`{}` has a TCP probe", c.name),
                    "in a meshed pod the kubelet's connection is redirected to the proxy, \
                        which accepts every connection: the probe passes even when the app is \
                        down or not listening"
                        .to_owned(),
                    "probe over HTTP (`httpGet`, which the injector forwards to the app \
                        through `/app-probe/`) or `exec`; or exclude the port with \
                        `outrider.io/skip-inbound-ports`"
                        .to_owned(),
                ],
            );
        }
        if let Some(get) = &probe.http_get {
            let injectors = get
                .path
                .as_deref()
                .is_some_and(|p| p.starts_with("/app-probe/"));
            if let Some(p) = resolve_port(c, &get.port).and_then(proxy_port) {
                if !(injectors && p == ports::ADMIN) {
                    self.probe_on_proxy_port(c, p, &format!("{path}.httpGet.port"));
                }
            }
        }
        if let Some(grpc) = &probe.grpc {
            if let Some(p) = proxy_port(grpc.port) {
                self.probe_on_proxy_port(c, p, &format!("{path}.grpc.port"));
            }
        }
    }

    fn probe_on_proxy_port(&mut self, c: &Container, port: u16, path: &str) {
        self.push(
            Severity::Error,
            "probe-on-proxy-port",
            path.to_owned(),
            [
                format!(
                    "`{}` is probed on {port}, a port of the Outrider proxy",
                    c.name
                ),
                "the probe then checks the proxy, not the container: the app can be dead \
                    while the pod looks healthy (or healthy while the pod restarts for the \
                    proxy)"
                    .to_owned(),
                "probe the container's own port; the injector rewrites HTTP probes to the \
                    proxy's `/app-probe/` for you"
                    .to_owned(),
            ],
        );
    }

    // ---- migrations and secrets -------------------------------------------------------------

    fn migration_and_secret_checks(&mut self, slots: &[(Container, Role, String)]) {
        let app_images: BTreeSet<&str> = slots
            .iter()
            .filter(|s| s.1 == Role::App)
            .filter_map(|s| s.0.image.as_deref())
            .collect();
        let deadline = self.w.pod.active_deadline_seconds.is_some()
            || (self.w.kind.runs_to_completion()
                && job_field(self.raw, self.w.kind, "activeDeadlineSeconds").is_some());
        for (c, role, path) in slots {
            if *role != Role::Init || deadline {
                continue;
            }
            let Some(image) = c.image.as_deref() else {
                continue;
            };
            if !app_images.contains(image) || is_outrider(c) || !is_migration(c) {
                continue;
            }
            let replicas = self
                .raw
                .get("spec")
                .and_then(|s| s.get("replicas"))
                .and_then(Value::as_u64);
            let concurrent = match replicas {
                Some(n) if n > 1 => {
                    format!("; with {n} replicas, {n} migrations start at once on every rollout")
                }
                _ => String::new(),
            };
            self.push(
                Severity::Warning,
                "migration-init",
                path.clone(),
                [
                    format!(
                        "init container `{}` runs the app's image `{image}` to migrate before the \
                        app starts, with no deadline",
                        c.name
                    ),
                    format!(
                        "a migration that hangs holds every new pod in `Init` with no timeout, \
                        and one that fails crash-loops with backoff up to 5 minutes per attempt \
                        while the rollout stalls{concurrent}"
                    ),
                    "run the migration once per release in a Job with `backoffLimit` and \
                        `activeDeadlineSeconds` before the rollout, or make it idempotent, take \
                        a lock, and bound it (`timeout`)"
                        .to_owned(),
                ],
            );
        }
        for (c, _, path) in slots {
            for (j, e) in c.env.iter().flatten().enumerate() {
                let Some(secret) = e
                    .value_from
                    .as_ref()
                    .and_then(|v| v.secret_key_ref.as_ref())
                else {
                    continue;
                };
                let what = format!(
                    "Secret `{}` (key `{}`) into `{}`",
                    secret.name, secret.key, e.name
                );
                self.secret_in_env(c, format!("{path}.env[{j}]"), &what);
            }
            for (j, from) in c.env_from.iter().flatten().enumerate() {
                if let Some(secret) = &from.secret_ref {
                    let what = format!(
                        "every key of Secret `{}` into environment variables",
                        secret.name
                    );
                    self.secret_in_env(c, format!("{path}.envFrom[{j}]"), &what);
                }
            }
        }
    }

    fn secret_in_env(&mut self, c: &Container, path: String, what: &str) {
        self.push(
            Severity::Info,
            "secret-in-env",
            path,
            [
                format!("`{}` reads {what}", c.name),
                "an environment variable is read once when the container starts: a rotated \
                    Secret reaches it only on a restart, while a Secret volume is refreshed in \
                    place by the kubelet"
                    .to_owned(),
                format!(
                    "where the Secret rotates, mount it as a volume and have `{}` re-read the file",
                    c.name
                ),
            ],
        );
    }
}

/// Tools that wait for a host in shell loops without resolving it first.
const WAIT_TOOLS: [&str; 10] = [
    "nc",
    "ncat",
    "netcat",
    "telnet",
    "curl",
    "wget",
    "pg_isready",
    "mysqladmin",
    "redis-cli",
    "mongosh",
];
/// Tools that resolve a name.
const DNS_TOOLS: [&str; 4] = ["nslookup", "getent", "dig", "host"];

/// Whether `c` is an init container with `restartPolicy: Always`.
pub fn is_native_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

fn is_outrider(c: &Container) -> bool {
    let image = c.image.as_deref().unwrap_or_default();
    let cmd0 = c.command.iter().flatten().next().map(String::as_str);
    image
        .rsplit('/')
        .next()
        .is_some_and(|i| i.starts_with("outrider:") || i == "outrider")
        || cmd0.is_some_and(|c| c == "outrider" || c.ends_with("/outrider"))
}

/// The field a container's script is in: `args` when it has them, else `command`.
fn script_field(c: &Container) -> &'static str {
    if c.args.is_some() {
        "args"
    } else {
        "command"
    }
}

/// The container's command and args as one string (a `sh -c` script is in there).
fn script(c: &Container) -> String {
    c.command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `script` with `$NAME` and `${NAME}` replaced by the values of the container's literal
/// environment variables (a wait loop often takes its target from one).
fn with_env(c: &Container, script: &str) -> String {
    let mut out = script.to_owned();
    for e in c.env.iter().flatten() {
        if let Some(v) = &e.value {
            out = out
                .replace(&format!("${{{}}}", e.name), v)
                .replace(&format!("${}", e.name), v);
        }
    }
    out
}

/// The script cut into shell words (quotes, `;`, `|`, `&`, parentheses and redirections are
/// separators).
fn words(script: &str) -> Vec<String> {
    script
        .split(|ch: char| ch.is_whitespace() || ";|&()'\"`<>{}".contains(ch))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Host names a wait loop targets: URL hosts, `-h HOST`/`--host[=]HOST`, `HOST:PORT`, and the
/// first operand of `nc`/`telnet` and of the DNS tools.
fn hosts(words: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |h: &str| {
        let h = h.trim_matches(|c: char| c == '[' || c == ']');
        let looks = !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            && h.chars().any(|c| c.is_ascii_alphabetic())
            && h != "localhost"
            && !h.starts_with('-')
            && !h.starts_with('$');
        if looks && !out.iter().any(|o| o == h) {
            out.push(h.to_owned());
        }
    };
    for (i, w) in words.iter().enumerate() {
        let next = words.get(i + 1).map(String::as_str).unwrap_or_default();
        if let Some((_, rest)) = w.split_once("://") {
            let authority = rest.split('/').next().unwrap_or_default();
            add(authority.rsplit_once(':').map_or(authority, |(h, _)| h));
        } else if w == "-h" || w == "--host" {
            add(next);
        } else if let Some(h) = w.strip_prefix("--host=") {
            add(h);
        } else if [
            "nc", "ncat", "netcat", "telnet", "nslookup", "dig", "host", "getent",
        ]
        .contains(&w.as_str())
        {
            // The first operand (`getent hosts NAME`: after the database).
            let operands = words[i + 1..].iter().filter(|o| !o.starts_with('-'));
            let mut operands = operands.skip_while(|o| w == "getent" && *o == "hosts");
            if let Some(operand) = operands.next() {
                add(operand);
            }
        } else if let Some((h, p)) = w.rsplit_once(':') {
            if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                add(h);
            }
        }
    }
    out
}

/// Whether `c`'s name or command says it migrates a schema.
fn is_migration(c: &Container) -> bool {
    const MARKS: [&str; 9] = [
        "migrat",
        "alembic",
        "flyway",
        "liquibase",
        "db:migrate",
        "schema",
        "sequelize",
        "knex",
        "upgrade",
    ];
    let text = format!("{} {}", c.name, script(c)).to_ascii_lowercase();
    MARKS.iter().any(|m| text.contains(m))
}

/// Whether `c` looks like it runs until stopped: a known sidecar, or a command that never ends.
fn is_long_running(c: &Container) -> bool {
    let s = script(c);
    let forever = [
        "tail -f",
        "tail -F",
        "sleep infinity",
        "sleep inf",
        "while true",
        "while :",
    ];
    is_sidecar_name(c) || forever.iter().any(|f| s.contains(f))
}

/// Names and images of common sidecars (proxies, log shippers, agents).
fn is_sidecar_name(c: &Container) -> bool {
    const MARKS: [&str; 13] = [
        "proxy",
        "envoy",
        "sidecar",
        "fluent",
        "logshipper",
        "log-shipper",
        "log-forwarder",
        "vector",
        "otel",
        "agent",
        "filebeat",
        "promtail",
        "refresh",
    ];
    let name = c.name.to_ascii_lowercase();
    let image = c.image.as_deref().unwrap_or_default().to_ascii_lowercase();
    let image = image.rsplit('/').next().unwrap_or_default();
    MARKS.iter().any(|m| name.contains(m) || image.contains(m))
}

/// How `init` uses `sidecar`, if it visibly does: a `localhost:PORT` of the sidecar in its
/// command or environment, or a volume the sidecar writes and the init container reads.
fn uses(init: &Container, sidecar: &Container) -> Option<String> {
    let mut text = script(init);
    for e in init.env.iter().flatten() {
        text.push(' ');
        text.push_str(e.value.as_deref().unwrap_or_default());
    }
    for p in sidecar.ports.iter().flatten() {
        for host in ["localhost", "127.0.0.1"] {
            let at = format!("{host}:{}", p.container_port);
            if text.contains(&at) {
                return Some(format!("connects to `{at}`, served by"));
            }
        }
    }
    if sidecar.name == inject::PROXY_NAME {
        return None;
    }
    let writes: BTreeSet<&str> = sidecar
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.read_only != Some(true))
        .map(|m| m.name.as_str())
        .collect();
    let reads = init
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| writes.contains(m.name.as_str()) && m.read_only == Some(true))?;
    Some(format!("reads volume `{}`, written by", reads.name))
}

fn proxy_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| PROXY_PORTS.contains(p))
}

fn join_ports() -> String {
    PROXY_PORTS
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A probe's port as a number: named ports through the container's `ports`.
fn resolve_port(c: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(p) => Some(*p),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

/// The QoS class Kubernetes gives a pod of these containers: Guaranteed when every container
/// has CPU and memory limits equal to its requests, BestEffort when none has any, Burstable
/// otherwise.
pub fn qos_class(rows: &[resources::Row]) -> &'static str {
    let none = rows
        .iter()
        .all(|r| r.requests.iter().chain(&r.limits).all(Option::is_none));
    if none {
        return "BestEffort";
    }
    let guaranteed = rows.iter().all(|r| {
        r.limits.iter().all(Option::is_some)
            && r.requests.iter().zip(&r.limits).all(|(q, l)| q == l)
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// An annotation of the pod template.
fn template_annotation(object: &Value, kind: WorkloadKind, key: &str) -> Option<String> {
    let mut v = object;
    for k in kind.template_path() {
        v = v.get(*k)?;
    }
    v.get("metadata")?
        .get("annotations")?
        .get(key)?
        .as_str()
        .map(str::to_owned)
}

/// A field of the Job spec (`spec.X` of a Job, `spec.jobTemplate.spec.X` of a CronJob).
fn job_field<'a>(object: &'a Value, kind: WorkloadKind, key: &str) -> Option<&'a Value> {
    let spec = object.get("spec")?;
    let spec = match kind {
        WorkloadKind::CronJob => spec.get("jobTemplate")?.get("spec")?,
        _ => spec,
    };
    spec.get(key)
}
