//! Pod Security Standards, `restricted` profile (Kubernetes 1.30), checked field by field on a pod
//! spec: the baseline controls plus the restricted ones, as the standard's page lists them. Used
//! by the tests of `outrider inject --cni` and of the webhook's CNI mode; `check` returns every violation, each naming its field.

use k8s_openapi::api::core::v1::{Container, PodSpec, SecurityContext};

/// Capabilities `restricted` allows adding.
const ADD_ALLOWED: [&str; 1] = ["NET_BIND_SERVICE"];
/// Volume types `restricted` allows.
const VOLUMES_ALLOWED: [&str; 8] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];
/// Sysctls baseline allows.
const SAFE_SYSCTLS: [&str; 7] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
];
/// SELinux types baseline allows (besides unset).
const SELINUX_TYPES: [&str; 3] = ["container_t", "container_init_t", "container_kvm_t"];

/// Every `restricted` violation of `pod`, each as `field: problem`.
pub fn check(pod: &PodSpec) -> Vec<String> {
    let mut v = Vec::new();
    for (field, set) in [
        ("spec.hostNetwork", pod.host_network),
        ("spec.hostPID", pod.host_pid),
        ("spec.hostIPC", pod.host_ipc),
    ] {
        if set == Some(true) {
            v.push(format!("{field}: must not be true"));
        }
    }
    let psc = pod.security_context.clone().unwrap_or_default();
    if psc.run_as_user == Some(0) {
        v.push("spec.securityContext.runAsUser: must not be 0".into());
    }
    let pod_seccomp_ok = psc
        .seccomp_profile
        .as_ref()
        .is_some_and(|p| p.type_ == "RuntimeDefault" || p.type_ == "Localhost");
    if psc
        .seccomp_profile
        .as_ref()
        .is_some_and(|p| p.type_ == "Unconfined")
    {
        v.push("spec.securityContext.seccompProfile.type: must not be Unconfined".into());
    }
    if let Some(se) = &psc.se_linux_options {
        if se.user.is_some() || se.role.is_some() {
            v.push("spec.securityContext.seLinuxOptions: user and role must be unset".into());
        }
        if se
            .type_
            .as_ref()
            .is_some_and(|t| !SELINUX_TYPES.contains(&t.as_str()))
        {
            v.push("spec.securityContext.seLinuxOptions.type: not an allowed type".into());
        }
    }
    for s in psc.sysctls.iter().flatten() {
        if !SAFE_SYSCTLS.contains(&s.name.as_str()) {
            v.push(format!(
                "spec.securityContext.sysctls: {} is not a safe sysctl",
                s.name
            ));
        }
    }
    for (i, vol) in pod.volumes.iter().flatten().enumerate() {
        let value = serde_json::to_value(vol).unwrap_or_default();
        let types: Vec<&String> = value
            .as_object()
            .map(|m| m.keys().filter(|k| *k != "name").collect())
            .unwrap_or_default();
        for t in types {
            if !VOLUMES_ALLOWED.contains(&t.as_str()) {
                v.push(format!("spec.volumes[{i}].{t}: volume type not allowed"));
            }
        }
    }
    let lists: [(&str, &[Container]); 2] = [
        (
            "initContainers",
            pod.init_containers.as_deref().unwrap_or(&[]),
        ),
        ("containers", &pod.containers),
    ];
    for (list, containers) in lists {
        for (i, c) in containers.iter().enumerate() {
            let at = format!("spec.{list}[{i}] ({})", c.name);
            container(
                &at,
                c,
                psc.run_as_non_root == Some(true),
                pod_seccomp_ok,
                &mut v,
            );
        }
    }
    v
}

fn container(at: &str, c: &Container, pod_non_root: bool, pod_seccomp: bool, v: &mut Vec<String>) {
    for (i, p) in c.ports.iter().flatten().enumerate() {
        if p.host_port.is_some_and(|h| h != 0) {
            v.push(format!("{at}.ports[{i}].hostPort: must be unset or 0"));
        }
    }
    let sc: SecurityContext = c.security_context.clone().unwrap_or_default();
    let mut bad =
        |field: &str, problem: &str| v.push(format!("{at}.securityContext.{field}: {problem}"));
    if sc.privileged == Some(true) {
        bad("privileged", "must not be true");
    }
    if sc.allow_privilege_escalation != Some(false) {
        bad("allowPrivilegeEscalation", "must be false");
    }
    match sc.run_as_non_root {
        Some(false) => bad("runAsNonRoot", "must not be false"),
        None if !pod_non_root => bad("runAsNonRoot", "must be true (here or on the pod)"),
        _ => {}
    }
    if sc.run_as_user == Some(0) {
        bad("runAsUser", "must not be 0");
    }
    match sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
        Some("RuntimeDefault" | "Localhost") => {}
        Some(other) => bad("seccompProfile.type", &format!("{other} is not allowed")),
        None if !pod_seccomp => bad(
            "seccompProfile",
            "must be RuntimeDefault or Localhost (here or on the pod)",
        ),
        None => {}
    }
    let caps = sc.capabilities.clone().unwrap_or_default();
    if !caps.drop.iter().flatten().any(|d| d == "ALL") {
        bad("capabilities.drop", "must include ALL");
    }
    for add in caps.add.iter().flatten() {
        if !ADD_ALLOWED.contains(&add.as_str()) {
            bad("capabilities.add", &format!("{add} is not allowed"));
        }
    }
    if sc.proc_mount.as_deref().is_some_and(|p| p != "Default") {
        bad("procMount", "must be Default");
    }
    if let Some(se) = &sc.se_linux_options {
        if se.user.is_some() || se.role.is_some() {
            bad("seLinuxOptions", "user and role must be unset");
        }
    }
    if let Some(a) = &sc.app_armor_profile {
        if a.type_ == "Unconfined" {
            bad("appArmorProfile.type", "must not be Unconfined");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::{self, InjectOptions};
    use crate::manifest::{self, Workload, WorkloadKind};

    /// A Deployment that already meets `restricted` on its own.
    const APP: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {outrider.io/skip-outbound-ports: "1,2"}
    spec:
      securityContext:
        runAsNonRoot: true
        seccompProfile: {type: RuntimeDefault}
      containers:
      - name: web
        image: web:1
        ports: [{containerPort: 8080}]
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {drop: [ALL]}
"#;

    fn pods(yaml: &str) -> Vec<PodSpec> {
        let mut docs = manifest::parse(yaml).unwrap();
        let mut out = Vec::new();
        manifest::for_each_object::<manifest::InputError>(&mut docs, |at, object| {
            if let Some(kind) = WorkloadKind::of(object) {
                out.push(Workload::check(kind, object, at)?.pod);
            }
            Ok(())
        })
        .unwrap();
        out
    }

    fn cni() -> InjectOptions {
        InjectOptions {
            cni: true,
            ..InjectOptions::default()
        }
    }

    #[test]
    fn cni_mode_passes_restricted_field_by_field_and_init_mode_does_not() {
        assert_eq!(check(&pods(APP)[0]), Vec::<String>::new());
        let out = inject::inject(APP, &cni()).unwrap();
        let pod = &pods(&out.yaml)[0];
        assert_eq!(check(pod), Vec::<String>::new(), "{}", out.yaml);
        let inits = pod.init_containers.as_deref().unwrap();
        assert_eq!(inits[0].name, inject::VALIDATE_NAME);
        assert_eq!(inits[1].name, inject::PROXY_NAME);
        assert!(inits.iter().all(|c| c.name != inject::INIT_NAME));
        let args = inits[0].args.as_deref().unwrap();
        // The probe's port is one the pod's skip-outbound-ports (1,2) do not exempt.
        assert_eq!(
            args,
            [
                "cni",
                "validate",
                "--outbound-port",
                "15001",
                "--probe",
                "198.18.255.254:3"
            ]
        );
        let sc = inits[0].security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_user, Some(i64::from(inject::VALIDATE_UID)));
        assert!(!out.yaml.contains("NET_ADMIN"));
        if crate::tests::validator() {
            let file = std::env::temp_dir()
                .join(format!("outrider-cni-inject-{}.yaml", std::process::id()));
            std::fs::write(&file, &out.yaml).unwrap();
            let v = crate::tests::validate(std::slice::from_ref(&file));
            let _ = std::fs::remove_file(&file);
            assert!(
                v.status.success(),
                "{}{}",
                String::from_utf8_lossy(&v.stdout),
                String::from_utf8_lossy(&v.stderr)
            );
        }

        // The same checker rejects the init mode: root with NET_ADMIN and NET_RAW.
        let plain = inject::inject(APP, &InjectOptions::default()).unwrap();
        let problems = check(&pods(&plain.yaml)[0]);
        let text = problems.join("\n");
        assert!(text.contains("spec.initContainers[0] (outrider-init).securityContext.capabilities.add: NET_ADMIN is not allowed"), "{text}");
        assert!(
            text.contains("(outrider-init).securityContext.runAsNonRoot: must not be false"),
            "{text}"
        );
        assert!(
            text.contains("(outrider-init).securityContext.runAsUser: must not be 0"),
            "{text}"
        );
    }

    #[test]
    fn the_capture_annotation_picks_the_mode_per_workload() {
        let annotated = APP.replace("annotations: {", "annotations: {outrider.io/capture: cni, ");
        let out = inject::inject(&annotated, &InjectOptions::default()).unwrap();
        assert_eq!(
            pods(&out.yaml)[0].init_containers.as_deref().unwrap()[0].name,
            inject::VALIDATE_NAME
        );
        let forced = APP.replace(
            "annotations: {",
            "annotations: {outrider.io/capture: init, ",
        );
        let out = inject::inject(&forced, &cni()).unwrap();
        assert_eq!(
            pods(&out.yaml)[0].init_containers.as_deref().unwrap()[0].name,
            inject::INIT_NAME
        );
        let bad = APP.replace(
            "annotations: {",
            "annotations: {outrider.io/capture: ebpf, ",
        );
        let e = inject::inject(&bad, &cni()).unwrap_err().to_string();
        assert!(
            e.contains("outrider.io/capture") && e.contains("`ebpf` is not a capture mode"),
            "{e}"
        );
        // Uninject takes CNI mode out as it does the init mode.
        let out = inject::inject(APP, &cni()).unwrap();
        let back = inject::uninject(&out.yaml).unwrap();
        let normalized = manifest::write(&manifest::parse(APP).unwrap()).unwrap();
        assert_eq!(back.yaml, normalized);
    }

    #[test]
    fn resources_with_proxy_reflect_the_mode() {
        let r = &crate::resource_reports_with(APP, Some(&cni())).unwrap()[0];
        let names: Vec<&str> = r.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, [inject::VALIDATE_NAME, inject::PROXY_NAME, "web"]);
        let r = &crate::resource_reports(APP, true).unwrap()[0];
        assert_eq!(r.rows[0].name, inject::INIT_NAME);
    }
}
