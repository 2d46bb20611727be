//! `outrider resources`: per workload, each container's requests and limits, and the pod's
//! effective request per resource as the scheduler computes it.
//!
//! The rule (Kubernetes 1.29+, KEP-753): app containers and native sidecars (init containers
//! with `restartPolicy: Always`) run together, so they add up; each ordinary init container runs
//! alone but next to the sidecars started before it. The pod requests the larger of the two:
//!
//! ```text
//! sidecars = 0; init_max = 0
//! for c in initContainers: if sidecar { sidecars += c; init_max = max(init_max, sidecars) }
//!                          else { init_max = max(init_max, c + sidecars) }
//! pod = max(init_max, sum(containers) + sidecars)
//! ```
//!
//! A container with a limit and no request requests its limit (the API server's default).
//! `--with-proxy` reports the workload as `outrider inject` would leave it. Pod overhead
//! (RuntimeClass) is not counted.

use std::fmt::Write as _;
use std::process::ExitCode;

use k8s_openapi::api::core::v1::Container;

use crate::inject::{self, InjectOptions};
use crate::manifest::{self, InputError, Location, Workload, WorkloadKind};
use crate::quantity::Quantity;

/// Flags of `outrider resources`.
#[derive(Debug, Clone, clap::Args)]
pub struct ResourcesArgs {
    /// The YAML to read (`-` for stdin).
    #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
    pub file: String,
    /// Count the containers `outrider inject` adds (native sidecar form).
    #[arg(long)]
    pub with_proxy: bool,
    /// With `--with-proxy`: count CNI mode's containers (`outrider inject --cni`).
    #[arg(long, requires = "with_proxy")]
    pub cni: bool,
}

/// The resources reported: CPU and memory.
pub const RESOURCES: [&str; 2] = ["cpu", "memory"];

/// How a container runs in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An ordinary init container: runs alone, to completion, before the app.
    Init,
    /// A native sidecar: an init container with `restartPolicy: Always`, runs beside the app.
    Sidecar,
    /// An app container.
    App,
}

/// One container's figures, `[cpu, memory]`.
#[derive(Debug, Clone)]
pub struct Row {
    /// Container name.
    pub name: String,
    /// How it runs.
    pub role: Role,
    /// Requests (a limit without a request counts as the request).
    pub requests: [Option<Quantity>; 2],
    /// Limits.
    pub limits: [Option<Quantity>; 2],
}

/// One workload's report; the sums are `[cpu, memory]`.
#[derive(Debug, Clone)]
pub struct Report {
    /// `Kind namespace/name`.
    pub workload: String,
    /// Every container, init containers first.
    pub rows: Vec<Row>,
    /// The largest init-phase request (with the sidecars started before each init container).
    pub init_max: [Quantity; 2],
    /// App containers plus sidecars.
    pub app_sum: [Quantity; 2],
    /// The pod's effective request: the larger of the two.
    pub pod: [Quantity; 2],
    /// Containers without requests or limits.
    pub warnings: Vec<String>,
}

/// Reports every workload of `text`, injected first when `with_proxy`.
pub fn reports(text: &str, with_proxy: bool) -> Result<Vec<Report>, InputError> {
    reports_with(text, with_proxy.then(InjectOptions::default).as_ref())
}

/// Reports every workload of `text`, injected with `opts` first when given (`--cni` too).
pub fn reports_with(
    text: &str,
    with_proxy: Option<&InjectOptions>,
) -> Result<Vec<Report>, InputError> {
    let mut docs = manifest::parse(text)?;
    if let Some(opts) = with_proxy {
        inject::inject_docs(&mut docs, opts, &mut Vec::new())?;
    }
    let mut out = Vec::new();
    manifest::for_each_object(&mut docs, |at, object| {
        if let Some(kind) = WorkloadKind::of(object) {
            out.push(report(&Workload::check(kind, object, at)?, at)?);
        }
        Ok::<(), InputError>(())
    })?;
    Ok(out)
}

/// One workload's report; a quantity that does not parse is an error at its field path.
pub fn report(w: &Workload, at: &Location) -> Result<Report, InputError> {
    let pfx = manifest::prefix(w.kind);
    let mut rows = Vec::new();
    let mut warnings = Vec::new();
    let inits = w.pod.init_containers.iter().flatten();
    for (i, c) in inits.enumerate() {
        let role = if c.restart_policy.as_deref() == Some("Always") {
            Role::Sidecar
        } else {
            Role::Init
        };
        let path = format!("{pfx}spec.initContainers[{i}]");
        rows.push(row(c, role, &path, at, &mut warnings)?);
    }
    for (i, c) in w.pod.containers.iter().enumerate() {
        let path = format!("{pfx}spec.containers[{i}]");
        rows.push(row(c, Role::App, &path, at, &mut warnings)?);
    }
    let mut init_max = [Quantity::ZERO; 2];
    let mut app_sum = [Quantity::ZERO; 2];
    let mut pod = [Quantity::ZERO; 2];
    for r in 0..2 {
        let mut sidecars = Quantity::ZERO;
        for row in &rows {
            let q = row.requests[r].unwrap_or_default();
            match row.role {
                Role::Sidecar => {
                    sidecars = sidecars + q;
                    init_max[r] = init_max[r].max(sidecars);
                }
                Role::Init => init_max[r] = init_max[r].max(q + sidecars),
                Role::App => app_sum[r] = app_sum[r] + q,
            }
        }
        app_sum[r] = app_sum[r] + sidecars;
        pod[r] = init_max[r].max(app_sum[r]);
    }
    let namespace = w.namespace.as_deref().unwrap_or("default");
    Ok(Report {
        workload: format!("{:?} {namespace}/{}", w.kind, w.name),
        rows,
        init_max,
        app_sum,
        pod,
        warnings,
    })
}

fn row(
    c: &Container,
    role: Role,
    path: &str,
    at: &Location,
    warnings: &mut Vec<String>,
) -> Result<Row, InputError> {
    let res = c.resources.as_ref();
    let get = |side: &str, r: &str| -> Result<Option<Quantity>, InputError> {
        let map = res.and_then(|res| {
            if side == "requests" {
                res.requests.as_ref()
            } else {
                res.limits.as_ref()
            }
        });
        match map.and_then(|m| m.get(r)) {
            None => Ok(None),
            Some(q) => {
                q.0.parse()
                    .map(Some)
                    .map_err(|e| at.error(format!("{path}.resources.{side}.{r}"), format!("{e}")))
            }
        }
    };
    let mut requests = [None; 2];
    let mut limits = [None; 2];
    for (i, r) in RESOURCES.iter().enumerate() {
        limits[i] = get("limits", r)?;
        requests[i] = get("requests", r)?.or(limits[i]);
    }
    let mut missing = Vec::new();
    if requests.iter().all(Option::is_none) {
        missing.push("no requests (the scheduler counts 0 for it)");
    }
    if limits.iter().all(Option::is_none) {
        missing.push("no limits (it may use all the node has)");
    }
    if !missing.is_empty() {
        warnings.push(format!("{}: {}", c.name, missing.join(", ")));
    }
    Ok(Row {
        name: c.name.clone(),
        role,
        requests,
        limits,
    })
}

/// The report as text: a table per workload, then the sums and warnings.
pub fn render(reports: &[Report]) -> String {
    let mut out = String::new();
    let cell = |q: Option<Quantity>, r: usize| match q {
        None => "-".to_owned(),
        Some(q) if r == 0 => q.cpu(),
        Some(q) => q.memory(),
    };
    for (n, rep) in reports.iter().enumerate() {
        if n > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "{}", rep.workload);
        let width = rep
            .rows
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(0)
            .max(9);
        let _ = writeln!(
            out,
            "  {:width$}  {:7}  {:>7}  {:>7}  {:>7}  {:>7}",
            "CONTAINER", "ROLE", "CPU REQ", "CPU LIM", "MEM REQ", "MEM LIM"
        );
        for r in &rep.rows {
            let role = match r.role {
                Role::Init => "init",
                Role::Sidecar => "sidecar",
                Role::App => "app",
            };
            let _ = writeln!(
                out,
                "  {:width$}  {:7}  {:>7}  {:>7}  {:>7}  {:>7}",
                r.name,
                role,
                cell(r.requests[0], 0),
                cell(r.limits[0], 0),
                cell(r.requests[1], 1),
                cell(r.limits[1], 1),
            );
        }
        let pair = |q: [Quantity; 2]| format!("cpu {}, memory {}", q[0].cpu(), q[1].memory());
        let _ = writeln!(out, "  init max:    {}", pair(rep.init_max));
        let _ = writeln!(
            out,
            "  app sum:     {} (sidecars included)",
            pair(rep.app_sum)
        );
        let _ = writeln!(out, "  pod request: {}", pair(rep.pod));
        for w in &rep.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
    }
    out
}

/// `outrider resources`: the report on stdout; bad input is exit 2.
pub fn main(args: ResourcesArgs) -> ExitCode {
    let text = match crate::read_input(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("outrider resources: cannot read {}: {e}", args.file);
            return ExitCode::from(1);
        }
    };
    let opts = InjectOptions {
        cni: args.cni,
        ..InjectOptions::default()
    };
    match reports_with(&text, args.with_proxy.then_some(&opts)) {
        Ok(reports) => {
            print!("{}", render(&reports));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outrider resources: {}: {e}", args.file);
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SEED: &str = include_str!("../../deploy/examples/payments-api.yaml");

    fn figures(r: &Report) -> [String; 6] {
        [
            r.init_max[0].cpu(),
            r.init_max[1].memory(),
            r.app_sum[0].cpu(),
            r.app_sum[1].memory(),
            r.pod[0].cpu(),
            r.pod[1].memory(),
        ]
    }

    #[test]
    fn the_seed_requests_600m_and_640mi() {
        let reports = reports(SEED, false).unwrap();
        assert_eq!(reports.len(), 1, "the Service is no workload");
        let r = &reports[0];
        assert_eq!(r.workload, "Deployment production/payments-api");
        // init max 200m/256Mi (migrate); app sum 500m+100m / 512Mi+128Mi; pod the larger.
        assert_eq!(
            figures(r),
            ["200m", "256Mi", "600m", "640Mi", "600m", "640Mi"]
        );
        assert_eq!(
            r.warnings,
            ["secrets-refresh: no requests (the scheduler counts 0 for it), no limits (it may use all the node has)"]
        );
        let text = render(&reports);
        assert!(
            text.contains("  pod request: cpu 600m, memory 640Mi\n"),
            "{text}"
        );
    }

    #[test]
    fn the_seed_with_the_proxy_costs_100m_and_128mi_more() {
        let r = &reports(SEED, true).unwrap()[0];
        let roles: Vec<_> = r.rows.iter().map(|r| (r.name.as_str(), r.role)).collect();
        assert_eq!(
            roles[..2],
            [
                ("outrider-init", Role::Init),
                ("outrider-proxy", Role::Sidecar)
            ]
        );
        // By hand: outrider-init 10m/16Mi alone; the proxy sidecar (100m/128Mi) then runs beside
        // every later init container: migrate 200m+100m / 256Mi+128Mi is the init max. The
        // app phase: 600m/640Mi plus the proxy.
        assert_eq!(
            figures(r),
            ["300m", "384Mi", "700m", "768Mi", "700m", "768Mi"]
        );
    }

    #[test]
    fn native_sidecars_count_for_the_init_containers_after_them() {
        let pod = r#"
apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  initContainers:
  - {name: init-a, image: x, resources: {requests: {cpu: 300m, memory: 100Mi}}}
  - {name: sidecar-1, image: x, restartPolicy: Always, resources: {requests: {cpu: 100m, memory: 200Mi}}}
  - {name: init-b, image: x, resources: {requests: {cpu: 250m, memory: 50Mi}}}
  - {name: sidecar-2, image: x, restartPolicy: Always, resources: {requests: {cpu: 50m, memory: 20Mi}}}
  containers:
  - {name: app, image: x, resources: {requests: {cpu: 100m, memory: 100Mi}}}
  - {name: metrics, image: x, resources: {limits: {memory: 10Mi}}}
"#;
        let r = &reports(pod, false).unwrap()[0];
        // cpu: init-a 300m; sidecar-1 → 100m running; init-b 250m + 100m = 350m (the max);
        //      sidecar-2 → 150m running. App: 100m + 0 (metrics has no cpu) + 150m = 250m.
        //      Pod: max(350m, 250m) = 350m, set by the init phase.
        // memory: init-a 100Mi; sidecar-1 → 200Mi; init-b 50Mi + 200Mi = 250Mi; sidecar-2 →
        //      220Mi. App: 100Mi + 10Mi (metrics' limit is its request) + 220Mi = 330Mi.
        //      Pod: max(250Mi, 330Mi) = 330Mi, set by the app phase.
        assert_eq!(
            figures(r),
            ["350m", "250Mi", "250m", "330Mi", "350m", "330Mi"]
        );
        // Every container but `metrics` has no limits; `metrics` has no explicit request, but
        // requests its limit.
        assert_eq!(r.warnings.len(), 5, "{:?}", r.warnings);
        assert!(r
            .warnings
            .iter()
            .all(|w| w.ends_with(": no limits (it may use all the node has)")));
        assert!(!r.warnings.iter().any(|w| w.starts_with("metrics")));
    }

    #[test]
    fn a_bad_quantity_names_its_field() {
        let bad = SEED.replacen(
            "cpu: 500m\n            memory: 512Mi",
            "cpu: 500mc\n            memory: 512Mi",
            1,
        );
        let e = reports(&bad, false).unwrap_err();
        assert_eq!(e.document, "document 1");
        assert_eq!(
            e.path,
            "spec.template.spec.containers[0].resources.requests.cpu"
        );
    }
}
