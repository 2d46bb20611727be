//! `outrider cni`: capture without `NET_ADMIN` in the pod. A chained CNI plugin that the
//! container runtime calls on the node when it sets up a pod's network; for a meshed pod it
//! programs, inside the pod's network namespace, exactly the rules `outrider init` would (the same
//! code: [`outrider_iptables_init::execute`]).
//!
//! The installed plugin is the `outrider` binary itself under the name the conflist uses,
//! `outrider-cni`: `main` dispatches on argv[0] (no wrapper script), and `outrider cni` with
//! no subcommand does the same. Modules: [`spec`] (the CNI protocol: environment, stdin, versions,
//! error objects), [`lookup`] (the bounded pod lookup), [`plugin`] (ADD, DEL, CHECK),
//! [`validate`] (`outrider cni validate`, the CNI mode's init container), [`install`] (`outrider
//! cni install`, the node agent).

pub mod install;
pub mod lookup;
pub mod plugin;
pub mod spec;
pub mod validate;

use std::io::Read as _;
use std::process::ExitCode;

use crate::lookup::{ApiLookup, PodLookup};
use crate::spec::{CniError, Code, Env, NetConf};

/// The name the plugin is installed under (the conflist's `type`).
pub const PLUGIN_NAME: &str = "outrider-cni";
/// The largest network configuration read from stdin (bytes).
const MAX_STDIN: u64 = 1 << 20;

/// `outrider cni`: with no subcommand, the CNI plugin itself (as the runtime calls it: `CNI_*`
/// environment, configuration on stdin).
#[derive(Debug, Clone, clap::Args)]
pub struct CniArgs {
    /// What to run instead of the plugin.
    #[command(subcommand)]
    pub command: Option<CniCommand>,
}

/// The subcommands of `outrider cni`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CniCommand {
    /// In a pod (init container, no privileges): exit 1 unless its outbound TCP is captured.
    Validate(validate::ValidateArgs),
    /// On the node (the DaemonSet): install the plugin, keep it chained, remove it on exit.
    Install(install::InstallArgs),
}

/// Runs `outrider cni`.
pub fn main(args: CniArgs) -> ExitCode {
    match args.command {
        None => plugin_main(),
        Some(CniCommand::Validate(v)) => validate::main(&v),
        Some(CniCommand::Install(i)) => install::main(i),
    }
}

/// The plugin entry point: reads the environment and stdin, runs the command, prints the result
/// or the spec's error object on stdout; exit 0 on success, 1 on error.
pub fn plugin_main() -> ExitCode {
    let mut stdin = String::new();
    if let Err(e) = std::io::stdin().take(MAX_STDIN).read_to_string(&mut stdin) {
        let err = CniError::new(Code::Decode, format!("cannot read stdin: {e}"));
        println!("{}", err.to_json(spec::LATEST_VERSION));
        return ExitCode::from(1);
    }
    let version = spec::version_of(&stdin);
    let result =
        Env::read(|k| std::env::var(k).ok()).and_then(|env| plugin::run(&env, &stdin, &api_lookup));
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrider-cni: error: {e}");
            println!("{}", e.to_json(&version));
            ExitCode::from(1)
        }
    }
}

/// The real lookup: the API server named by the configured kubeconfig (read at the lookup: a
/// kubeconfig that cannot be read fails only a pod that needs the lookup).
fn api_lookup(conf: &NetConf) -> Box<dyn PodLookup> {
    Box::new(ApiLookup {
        kubeconfig: conf.kubeconfig.clone().into(),
        timeout: conf.api_timeout,
    })
}
