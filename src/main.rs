//! `outrider`: one binary for the whole mesh. Each subcommand is one component:
//! `init` (traffic capture), `proxy` (the sidecar), `control` (the control plane), `demo`
//! (everything on loopback); and for Kubernetes `inject`, `wait`, `resources` and `analyze`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outrider::{demo, runtime};

/// Outrider: a service-mesh sidecar.
#[derive(Debug, Parser)]
#[command(name = "outrider", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Program iptables in the pod's network namespace so its TCP goes through the proxy, then exit.
    Init(outrider_iptables_init::InitArgs),
    /// Run the sidecar proxy (or, with --forward, a local proxy in front of a service).
    Proxy(Box<outrider_proxy::ProxyArgs>),
    /// Run the control plane: serve the mesh config (YAML) to proxies over the watch API, and
    /// issue their certificates (`ca init` and `token` prepare the CA and bootstrap tokens).
    Control(Box<outrider_control::ControlArgs>),
    /// Add the mesh to Kubernetes workload YAML (or take it out with --uninject); prints the result.
    Inject(outrider_kubernetes::InjectArgs),
    /// Wait until TCP/HTTP dependencies answer (an init container): exit 0 when all do.
    Wait(outrider_kubernetes::WaitArgs),
    /// Report each workload's container resources and the pod's effective request.
    Resources(outrider_kubernetes::ResourcesArgs),
    /// Why a pod will not start: findings on manifests (-f), or a diagnosis of live pods (--status).
    Analyze(outrider_kubernetes::AnalyzeArgs),
    /// The CNI plugin (installed as `outrider-cni`): programs meshed pods' capture from the node.
    Cni(outrider_cni::CniArgs),
    /// Run the whole data path on loopback (no root): load → proxy → proxy → app, then a summary.
    Demo(demo::DemoArgs),
    /// Run only the demo's built-in app (HTTP/1.1 + h2c, upgrade echo); used by the tests.
    #[command(hide = true)]
    DemoApp {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Instance name in every answer.
        #[arg(long, default_value = "payments-api-0")]
        instance: String,
    },
}

fn main() -> ExitCode {
    // Installed as `outrider-cni` in the CNI bin directory, the binary is the CNI plugin.
    if std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n == outrider_cni::PLUGIN_NAME)
        })
        .unwrap_or(false)
    {
        return outrider_cni::plugin_main();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // clap uses 0 for --help/--version and 2 for usage errors, as DESIGN.md wants.
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    match cli.command {
        Command::Init(args) => outrider_iptables_init::main(args),
        Command::Proxy(args) => proxy(*args),
        Command::Control(args) => control(*args),
        Command::Inject(args) => outrider_kubernetes::inject_main(args),
        Command::Wait(args) => outrider_kubernetes::wait::main(args),
        Command::Resources(args) => outrider_kubernetes::resources_main(args),
        Command::Analyze(args) => outrider_kubernetes::analyze::main(args),
        Command::Cni(args) => outrider_cni::main(args),
        Command::Demo(args) => demo::main(args),
        Command::DemoApp { listen, instance } => demo::app::main(listen, instance),
    }
}

/// `outrider control`: a subcommand (`ca init`, `token`), `--check`, or the control plane on a
/// one-thread runtime until SIGTERM or SIGINT.
fn control(mut args: outrider_control::ControlArgs) -> ExitCode {
    if let Some(command) = args.command.take() {
        return outrider_control::cli::run(command);
    }
    match outrider_control::prepare(&args) {
        outrider_control::Prepared::Exit(code) => code,
        outrider_control::Prepared::Serve(prepared) => {
            let (mesh, text) = *prepared;
            let hook = outrider::inject_hook::InjectHook::for_webhook(&args);
            runtime::block_on(
                "outrider control",
                1,
                outrider_control::serve_with(
                    args,
                    mesh,
                    text,
                    Some(std::sync::Arc::new(hook)),
                    runtime::shutdown_signal(),
                ),
            )
        }
    }
}

/// `outrider proxy`: every flag problem reported at once (exit 2), then the proxy on a runtime
/// of `--workers` threads until SIGTERM or SIGINT.
fn proxy(args: outrider_proxy::ProxyArgs) -> ExitCode {
    let config = match outrider_proxy::Config::from_args(args) {
        Ok(config) => config,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("outrider proxy: {e}");
            }
            return ExitCode::from(2);
        }
    };
    let log = match outrider_proxy::log::init(config.log_format) {
        Ok(log) => Some(log),
        Err(e) => {
            eprintln!("outrider proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let workers = config.workers;
    runtime::block_on(
        "outrider proxy",
        workers,
        outrider_proxy::run(config, log, runtime::shutdown_signal()),
    )
}
