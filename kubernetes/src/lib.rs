//! Outrider on Kubernetes, without a cluster connection: `outrider inject` (the mesh added to
//! workload YAML), `outrider wait` (the dependency-wait init container) and `outrider resources`
//! (what a pod requests, with and without the mesh), `outrider analyze` (why a pod will not
//! start, from its manifest or its live status).
//!
//! Everything here reads files or stdin and writes stdout; nothing talks to an API server.
//! Kubernetes objects are checked against the typed structs of `k8s-openapi` (API 1.30) and
//! edited as ordered YAML, so what the injector does not own comes back as it was. Exit codes:
//! 0 done, 1 runtime failure (a file that cannot be read, a dependency not reachable in time),
//! 2 bad usage or bad input (with the document and the field path).

pub mod analyze;
pub mod capture;
pub mod emit;
pub mod inject;
pub mod manifest;
pub mod quantity;
pub mod resources;
pub mod restricted;
pub mod wait;
mod yaml11;

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

pub use analyze::AnalyzeArgs;
pub use resources::ResourcesArgs;
pub use wait::WaitArgs;

/// Flags of `outrider inject`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// The YAML to inject (`-` for stdin): multi-document, `List`s too.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|-",
        default_value = "-"
    )]
    pub file: String,
    /// Take the mesh out again instead (restores the app's probes and init containers).
    #[arg(long)]
    pub uninject: bool,
    /// The pre-1.29 form: the proxy as the first regular container, not a native sidecar.
    #[arg(long, conflicts_with = "uninject")]
    pub legacy_sidecar: bool,
    /// CNI mode: capture by the node's `outrider-cni` plugin; no `outrider-init`, no
    /// capabilities in the pod (Pod Security `restricted`), a validation init container instead.
    #[arg(long, conflicts_with = "uninject")]
    pub cni: bool,
    /// The image with the `outrider` binary.
    #[arg(long, value_name = "IMAGE", default_value = inject::DEFAULT_IMAGE)]
    pub image: String,
    /// The control plane URL the proxies connect to.
    #[arg(long, value_name = "URL", default_value = inject::DEFAULT_CONTROL)]
    pub control: String,
    /// Inject workloads otherwise skipped with a warning: in kube-system or kube-public, or
    /// meshed (or to be meshed) by Istio or Linkerd.
    #[arg(long, conflicts_with = "uninject")]
    pub force: bool,
    /// The proxy's bootstrap token: `projected` (a projected ServiceAccount token for the
    /// audience `outrider`, checked by the control plane with TokenReview; needs `outrider control
    /// --kubernetes`) or `secret` (the Secret `outrider-token-<serviceaccount>`, minted with
    /// `outrider control token`, for a control plane without the API). The annotation
    /// `outrider.io/identity-token` beats it per workload.
    #[arg(
        long,
        value_name = "KIND",
        value_enum,
        default_value = "projected",
        conflicts_with = "uninject"
    )]
    pub identity_token: inject::IdentityToken,
}

/// Whether an image reference names its registry (`registry.example/outrider:1`,
/// `localhost:5000/outrider`), as opposed to a Docker Hub short name (`outrider:0.1.0`).
pub fn has_registry(image: &str) -> bool {
    image.split_once('/').is_some_and(|(first, _)| {
        first.contains('.') || first.contains(':') || first == "localhost"
    })
}

/// Reads `file` (`-` is stdin).
pub fn read_input(file: &str) -> std::io::Result<String> {
    if file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(file)
    }
}

/// `outrider inject`: the injected YAML on stdout, warnings on stderr; on bad input nothing on
/// stdout and exit 2.
pub fn inject_main(args: InjectArgs) -> ExitCode {
    let text = match read_input(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("outrider inject: cannot read {}: {e}", args.file);
            return ExitCode::from(1);
        }
    };
    if args.image.trim().is_empty() || args.image.contains(char::is_whitespace) {
        eprintln!(
            "outrider inject: --image: `{}` is not an image reference",
            args.image
        );
        return ExitCode::from(2);
    }
    let control_ok = args
        .control
        .parse::<http::Uri>()
        .is_ok_and(|u| matches!(u.scheme_str(), Some("https" | "http")) && u.host().is_some());
    if !control_ok {
        eprintln!(
            "outrider inject: --control: `{}` is not an http(s):// URL with a host",
            args.control
        );
        return ExitCode::from(2);
    }
    let result = if args.uninject {
        inject::uninject(&text)
    } else {
        let opts = inject::InjectOptions {
            image: args.image.clone(),
            control: args.control,
            legacy_sidecar: args.legacy_sidecar,
            force: args.force,
            cni: args.cni,
            identity_token: args.identity_token,
        };
        inject::inject(&text, &opts)
    };
    match result {
        Ok(out) => {
            for w in &out.warnings {
                eprintln!("outrider inject: warning: {w}");
            }
            if !args.uninject && !has_registry(&args.image) && out.yaml.contains(inject::PROXY_NAME)
            {
                eprintln!(
                    "outrider inject: warning: the image {} names no registry: a cluster pulls it \
                     from Docker Hub and fails (ErrImagePull) unless it was loaded onto the nodes \
                     (kind load); give --image REGISTRY/outrider:TAG",
                    args.image
                );
            }
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(out.yaml.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("outrider inject: cannot write the output: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            eprintln!("outrider inject: {}: {e}", args.file);
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod corpus_tests;
#[cfg(test)]
mod tests;

/// Reports every workload of `text` (`outrider resources`), injected first when `with_proxy`.
pub fn resource_reports(
    text: &str,
    with_proxy: bool,
) -> Result<Vec<resources::Report>, manifest::InputError> {
    resource_reports_with(
        text,
        with_proxy.then(inject::InjectOptions::default).as_ref(),
    )
}

/// Reports every workload of `text`, injected with `opts` first when given (`--cni` too).
pub fn resource_reports_with(
    text: &str,
    with_proxy: Option<&inject::InjectOptions>,
) -> Result<Vec<resources::Report>, manifest::InputError> {
    match with_proxy {
        None => resources::reports_prepared(text, None),
        Some(opts) => {
            let prepare = |at: &manifest::Location, object: &mut serde_norway::Value| {
                inject::inject_object(at, object, opts, &mut Vec::new())
            };
            resources::reports_prepared(text, Some(&prepare))
        }
    }
}

/// `outrider resources`: the report on stdout; bad input is exit 2.
pub fn resources_main(args: resources::ResourcesArgs) -> ExitCode {
    let text = match crate::read_input(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("outrider resources: cannot read {}: {e}", args.file);
            return ExitCode::from(1);
        }
    };
    let opts = inject::InjectOptions {
        cni: args.cni,
        ..inject::InjectOptions::default()
    };
    match resource_reports_with(&text, args.with_proxy.then_some(&opts)) {
        Ok(reports) => {
            print!("{}", resources::render(&reports));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outrider resources: {}: {e}", args.file);
            ExitCode::from(2)
        }
    }
}
