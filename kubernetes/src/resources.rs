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
//! The same rule gives the pod's limit, unbounded when a container has none. Pod-level
//! `spec.resources` (Kubernetes 1.32+), where set, is what the scheduler uses instead; the
//! RuntimeClass `overhead` is added on top. Besides CPU and memory, ephemeral-storage,
//! hugepages and extended resources (`nvidia.com/gpu`) are summed the same way. The report
//! shows the pod's QoS class and names each container without a CPU or memory request or
//! limit. `--with-proxy` reports the workload as `outrider inject` would leave it.

use std::fmt::Write as _;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;

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

/// A pod's quality-of-service class, as the kubelet derives it (eviction order, CPU manager).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// Every container has CPU and memory limits, and requests equal to them.
    Guaranteed,
    /// Some requests or limits, not Guaranteed.
    Burstable,
    /// No CPU or memory request or limit anywhere: evicted first.
    BestEffort,
}

/// The QoS class of a pod: from pod-level `resources` when set (Kubernetes 1.32+), else from
/// every container's, init containers included. A quantity that does not parse counts as
/// missing (the report names it elsewhere).
pub fn qos(pod: &PodSpec, pod_resources: Option<&ResourceRequirements>) -> Qos {
    let side = |res: Option<&ResourceRequirements>, limits: bool, r: &str| {
        res.and_then(|res| {
            if limits {
                res.limits.as_ref()
            } else {
                res.requests.as_ref()
            }
        })
        .and_then(|m| m.get(r))
        .and_then(|q| q.0.parse::<Quantity>().ok())
    };
    let guaranteed = |res: Option<&ResourceRequirements>| {
        RESOURCES.iter().all(|r| {
            let limit = side(res, true, r);
            limit.is_some() && side(res, false, r).or(limit) == limit
        })
    };
    let any = |res: Option<&ResourceRequirements>| {
        RESOURCES
            .iter()
            .any(|r| side(res, true, r).is_some() || side(res, false, r).is_some())
    };
    if let Some(res) = pod_resources.filter(|r| any(Some(r))) {
        return if guaranteed(Some(res)) {
            Qos::Guaranteed
        } else {
            Qos::Burstable
        };
    }
    let all: Vec<Option<&ResourceRequirements>> = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .map(|c| c.resources.as_ref())
        .collect();
    if !all.iter().any(|r| any(*r)) {
        Qos::BestEffort
    } else if all.iter().all(|r| guaranteed(*r)) {
        Qos::Guaranteed
    } else {
        Qos::Burstable
    }
}

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
    /// Every resource's request (a limit without a request counts), CPU and memory included.
    pub all_requests: BTreeMap<String, Quantity>,
    /// Every resource's limit.
    pub all_limits: BTreeMap<String, Quantity>,
}

/// A resource summed over the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Total {
    /// `cpu`, `memory`, `ephemeral-storage`, `hugepages-2Mi`, `nvidia.com/gpu`, ...
    pub resource: String,
    /// What the scheduler reserves: the pod-level request where set, else the containers'
    /// aggregate; plus the overhead.
    pub request: Quantity,
    /// The pod's limit: pod-level where set, else the containers' aggregate (`None`: a
    /// container has no limit, so the pod has none); plus the overhead.
    pub limit: Option<Quantity>,
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
    /// The containers' aggregate request: the larger of the two.
    pub pod: [Quantity; 2],
    /// Every resource the pod asks for, as the scheduler counts it (pod-level resources and
    /// overhead included), CPU and memory first.
    pub totals: Vec<Total>,
    /// The RuntimeClass overhead (`spec.overhead`), included in `totals`.
    pub overhead: BTreeMap<String, Quantity>,
    /// Whether pod-level `spec.resources` set the totals.
    pub pod_level: bool,
    /// The QoS class.
    pub qos: Qos,
    /// Containers without CPU or memory requests or limits.
    pub warnings: Vec<String>,
}

/// What [`reports_prepared`] does to each object before it is reported (e.g. inject it).
pub type Prepare<'a> = dyn Fn(&Location, &mut serde_norway::Value) -> Result<(), InputError> + 'a;

/// Reports every workload of `text`, each object passed through `prepare` first (the crate root's
/// [`crate::resource_reports_with`] injects it, for `--with-proxy`).
pub fn reports_prepared(
    text: &str,
    prepare: Option<&Prepare<'_>>,
) -> Result<Vec<Report>, InputError> {
    let mut out = Vec::new();
    for doc in manifest::documents(text)? {
        let (i, mut doc) = doc?;
        manifest::visit(
            i,
            &mut doc,
            &mut |at: &Location, object: &mut serde_norway::Value| {
                if let Some(prepare) = prepare {
                    prepare(at, object)?;
                }
                if let Some(kind) = WorkloadKind::of(object) {
                    out.push(report(&Workload::check(kind, object, at)?, at)?);
                }
                Ok::<(), InputError>(())
            },
        )?;
    }
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
    for (r, name) in RESOURCES.iter().enumerate() {
        let (i, a) = aggregate(&rows, name, false);
        (init_max[r], app_sum[r], pod[r]) = (
            i.unwrap_or_default(),
            a.unwrap_or_default(),
            i.unwrap_or_default().max(a.unwrap_or_default()),
        );
    }
    let parse_map = |map: Option<&BTreeMap<String, K8sQuantity>>, path: &str| {
        let mut out = BTreeMap::new();
        for (k, q) in map.into_iter().flatten() {
            let v: Quantity =
                q.0.parse()
                    .map_err(|e| at.error(format!("{path}.{k}"), format!("{e}")))?;
            out.insert(k.clone(), v);
        }
        Ok::<_, InputError>(out)
    };
    let overhead = parse_map(w.pod.overhead.as_ref(), &format!("{pfx}spec.overhead"))?;
    let pod_res = w.pod_resources.as_ref();
    let pod_requests = parse_map(
        pod_res.and_then(|r| r.requests.as_ref()),
        &format!("{pfx}spec.resources.requests"),
    )?;
    let pod_limits = parse_map(
        pod_res.and_then(|r| r.limits.as_ref()),
        &format!("{pfx}spec.resources.limits"),
    )?;
    let mut names: Vec<String> = RESOURCES.iter().map(|r| (*r).to_owned()).collect();
    let mut others: Vec<String> = rows
        .iter()
        .flat_map(|r| r.all_requests.keys().chain(r.all_limits.keys()))
        .chain(pod_requests.keys().chain(pod_limits.keys()))
        .filter(|k| !RESOURCES.contains(&k.as_str()))
        .cloned()
        .collect();
    others.sort();
    others.dedup();
    names.extend(others);
    let mut totals = Vec::new();
    for name in names {
        let (ri, ra) = aggregate(&rows, &name, false);
        let (li, la) = aggregate(&rows, &name, true);
        let over = overhead.get(&name).copied();
        let request = pod_requests
            .get(&name)
            .copied()
            .or_else(|| pod_limits.get(&name).copied())
            .unwrap_or_else(|| ri.unwrap_or_default().max(ra.unwrap_or_default()));
        // A container without the limit leaves the pod without one.
        let unbounded = rows.iter().any(|r| !r.all_limits.contains_key(&name));
        let limit = pod_limits.get(&name).copied().or(if unbounded {
            None
        } else {
            Some(li.unwrap_or_default().max(la.unwrap_or_default()))
        });
        let add = |q: Quantity| q + over.unwrap_or_default();
        if request.is_zero()
            && limit.is_none()
            && over.is_none()
            && !RESOURCES.contains(&name.as_str())
        {
            continue;
        }
        totals.push(Total {
            resource: name,
            request: add(request),
            limit: limit.map(add),
        });
    }
    let namespace = w.namespace.as_deref().unwrap_or("default");
    Ok(Report {
        workload: format!("{:?} {namespace}/{}", w.kind, w.name),
        rows,
        init_max,
        app_sum,
        pod,
        totals,
        overhead,
        pod_level: pod_res.is_some_and(|r| r.requests.is_some() || r.limits.is_some()),
        qos: qos(&w.pod, pod_res),
        warnings,
    })
}

/// The KEP-753 rule for one resource over the rows: (init-phase maximum, app phase with the
/// sidecars); `None` where no container of that phase names the resource.
fn aggregate(rows: &[Row], name: &str, limits: bool) -> (Option<Quantity>, Option<Quantity>) {
    let (mut init_max, mut app, mut sidecars) =
        (None::<Quantity>, None::<Quantity>, Quantity::ZERO);
    let mut any_sidecar = false;
    for row in rows {
        let map = if limits {
            &row.all_limits
        } else {
            &row.all_requests
        };
        let q = map.get(name).copied();
        match row.role {
            Role::Sidecar => {
                sidecars = sidecars + q.unwrap_or_default();
                any_sidecar |= q.is_some();
                init_max = Some(init_max.unwrap_or_default().max(sidecars));
            }
            Role::Init => {
                init_max = Some(
                    init_max
                        .unwrap_or_default()
                        .max(q.unwrap_or_default() + sidecars),
                );
            }
            Role::App => app = Some(app.unwrap_or_default() + q.unwrap_or_default()),
        }
    }
    let app = match (app, any_sidecar) {
        (None, false) => None,
        (a, _) => Some(a.unwrap_or_default() + sidecars),
    };
    (init_max, app)
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
    let mut all_requests = BTreeMap::new();
    let mut all_limits = BTreeMap::new();
    let names = res
        .iter()
        .flat_map(|r| r.requests.iter().chain(r.limits.iter()))
        .flat_map(|m| m.keys().cloned())
        .collect::<std::collections::BTreeSet<String>>();
    for name in names {
        let limit = get("limits", &name)?;
        if let Some(l) = limit {
            all_limits.insert(name.clone(), l);
        }
        if let Some(q) = get("requests", &name)?.or(limit) {
            all_requests.insert(name, q);
        }
    }
    let missing = |q: &[Option<Quantity>; 2]| {
        let names: Vec<&str> = RESOURCES
            .iter()
            .zip(q)
            .filter(|(_, q)| q.is_none())
            .map(|(n, _)| *n)
            .collect();
        names.join(" or ")
    };
    let mut said = Vec::new();
    let (no_req, no_lim) = (missing(&requests), missing(&limits));
    if !no_req.is_empty() {
        said.push(format!(
            "no {no_req} request (the scheduler counts 0 for it)"
        ));
    }
    if !no_lim.is_empty() {
        said.push(format!("no {no_lim} limit (it may use all the node has)"));
    }
    if !said.is_empty() {
        warnings.push(format!("{}: {}", c.name, said.join(", ")));
    }
    Ok(Row {
        name: c.name.clone(),
        role,
        requests,
        limits,
        all_requests,
        all_limits,
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
        let show = |t: &Total, q: Quantity| {
            if t.resource == "cpu" {
                q.cpu()
            } else if t.resource == "memory"
                || t.resource == "ephemeral-storage"
                || t.resource.starts_with("hugepages-")
            {
                q.memory()
            } else {
                q.cpu()
            }
        };
        let list = |limit: bool| {
            rep.totals
                .iter()
                .filter(|t| RESOURCES.contains(&t.resource.as_str()))
                .map(|t| {
                    let v = if limit {
                        t.limit.map_or("none".into(), |q| show(t, q))
                    } else {
                        show(t, t.request)
                    };
                    format!("{} {v}", t.resource)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let from = if rep.pod_level {
            " (pod-level spec.resources)"
        } else {
            ""
        };
        let _ = writeln!(out, "  pod request: {}{from}", list(false));
        let _ = writeln!(out, "  pod limit:   {}", list(true));
        if !rep.overhead.is_empty() {
            let over: Vec<String> = rep
                .overhead
                .iter()
                .map(|(k, q)| {
                    let t = Total {
                        resource: k.clone(),
                        request: *q,
                        limit: None,
                    };
                    format!("{k} {}", show(&t, *q))
                })
                .collect();
            let _ = writeln!(
                out,
                "  overhead:    {} (RuntimeClass; included above)",
                over.join(", ")
            );
        }
        let others: Vec<String> = rep
            .totals
            .iter()
            .filter(|t| !RESOURCES.contains(&t.resource.as_str()))
            .map(|t| {
                let limit = t.limit.map_or("none".into(), |q| show(t, q));
                format!("{} {} (limit {limit})", t.resource, show(t, t.request))
            })
            .collect();
        if !others.is_empty() {
            let _ = writeln!(out, "  other:       {}", others.join(", "));
        }
        let _ = writeln!(out, "  QoS class:   {:?}", rep.qos);
        for w in &rep.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::resource_reports as reports;

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
            ["secrets-refresh: no cpu or memory request (the scheduler counts 0 for it), no cpu or memory limit (it may use all the node has)"]
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
        // Every container but `metrics` has no limits; `metrics` requests its memory limit
        // and is named for its missing CPU request and limit.
        assert_eq!(r.warnings.len(), 6, "{:?}", r.warnings);
        assert!(r.warnings[..5]
            .iter()
            .all(|w| w.ends_with(": no cpu or memory limit (it may use all the node has)")));
        assert_eq!(
            r.warnings[5],
            "metrics: no cpu request (the scheduler counts 0 for it), no cpu limit (it may use all the node has)"
        );
    }

    fn total(r: &Report, name: &str) -> (String, Option<String>) {
        let t = r.totals.iter().find(|t| t.resource == name).unwrap();
        let f = |q: Quantity| {
            if name == "cpu" || name.contains('/') {
                q.cpu()
            } else {
                q.memory()
            }
        };
        (f(t.request), t.limit.map(f))
    }

    #[test]
    fn limits_overhead_pod_level_and_other_resources_as_the_audit_worked_them() {
        // r09: limits by the same rule: init max(4, 500m, 3 + 500m) = 4; app 1 + 200m + 500m.
        let r09 = r#"
apiVersion: v1
kind: Pod
metadata: {name: r09}
spec:
  initContainers:
  - {name: i1, image: x, resources: {limits: {cpu: "4", memory: 2Gi}}}
  - {name: s1, image: x, restartPolicy: Always, resources: {limits: {cpu: 500m, memory: 256Mi}}}
  - {name: i2, image: x, resources: {limits: {cpu: "3", memory: 1Gi}}}
  containers:
  - {name: a, image: x, resources: {limits: {cpu: "1", memory: 1Gi}}}
  - {name: b, image: x, resources: {limits: {cpu: 200m, memory: 128Mi}}}
"#;
        let r = &reports(r09, false).unwrap()[0];
        assert_eq!(total(r, "cpu"), ("4".into(), Some("4".into())));
        assert_eq!(total(r, "memory"), ("2Gi".into(), Some("2Gi".into())));
        assert_eq!(r.qos, Qos::Guaranteed);
        // r06: RuntimeClass overhead on top; r05: other resources; a container without a
        // limit leaves the pod without one.
        let r06 = r#"
apiVersion: v1
kind: Pod
metadata: {name: r06}
spec:
  overhead: {cpu: 250m, memory: 120Mi}
  initContainers:
  - {name: i, image: x, resources: {requests: {ephemeral-storage: 10Gi}}}
  containers:
  - {name: a, image: x, resources: {requests: {cpu: 500m, memory: 512Mi, ephemeral-storage: 2Gi, hugepages-2Mi: 100Mi}, limits: {nvidia.com/gpu: 1, hugepages-2Mi: 100Mi}}}
  - {name: b, image: x, resources: {requests: {ephemeral-storage: 1Gi, example.com/foo: 2}}}
"#;
        let r = &reports(r06, false).unwrap()[0];
        assert_eq!(total(r, "cpu"), ("750m".into(), None));
        assert_eq!(total(r, "memory"), ("632Mi".into(), None));
        assert_eq!(total(r, "ephemeral-storage").0, "10Gi");
        assert_eq!(total(r, "hugepages-2Mi").0, "100Mi");
        assert_eq!(total(r, "nvidia.com/gpu"), ("1".into(), None));
        assert_eq!(total(r, "example.com/foo").0, "2");
        assert_eq!(r.qos, Qos::Burstable);
        let text = render(std::slice::from_ref(r));
        assert!(
            text.contains("  pod request: cpu 750m, memory 632Mi\n"),
            "{text}"
        );
        assert!(
            text.contains("  pod limit:   cpu none, memory none\n"),
            "{text}"
        );
        assert!(
            text.contains("  overhead:    cpu 250m, memory 120Mi (RuntimeClass; included above)\n"),
            "{text}"
        );
        assert!(
            text.contains("ephemeral-storage 10Gi (limit none)"),
            "{text}"
        );
        assert!(text.contains("  QoS class:   Burstable\n"), "{text}");
        // r07: pod-level requests win over the containers'.
        let r07 = r#"
apiVersion: v1
kind: Pod
metadata: {name: r07}
spec:
  resources: {requests: {cpu: 1, memory: 100Mi}, limits: {cpu: 1, memory: 200Mi}}
  containers:
  - {name: a, image: x, resources: {requests: {cpu: 500m, memory: 50Mi}}}
  - {name: b, image: x}
"#;
        let r = &reports(r07, false).unwrap()[0];
        assert_eq!(total(r, "cpu"), ("1".into(), Some("1".into())));
        assert_eq!(total(r, "memory"), ("100Mi".into(), Some("200Mi".into())));
        assert!(render(std::slice::from_ref(r)).contains("memory 100Mi (pod-level spec.resources)"));
        // r04, unquoted: memory sums in binary units.
        let r04 = "apiVersion: v1\nkind: Pod\nmetadata: {name: r04}\nspec:\n  containers:\n  - {name: a, image: x, resources: {requests: {cpu: 0.5, memory: 1G}}}\n  - {name: b, image: x, resources: {requests: {cpu: 500m, memory: 1Gi}}}\n  - {name: c, image: x, resources: {requests: {cpu: 0.1, memory: 1e3}}}\n  - {name: d, image: x, resources: {requests: {cpu: 100000u, memory: 129e6}}}\n  - {name: e, image: x, resources: {requests: {cpu: 250000000n, memory: 128974848000m}}}\n";
        let r = &reports(r04, false).unwrap()[0];
        assert_eq!(total(r, "cpu").0, "1450m");
        assert_eq!(total(r, "memory").0, "2.2Gi");
        assert_eq!(r.pod[1].memory_exact(), "2331717672");
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
