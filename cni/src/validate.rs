//! `outrider cni validate`: the CNI mode's init container. It proves, from inside the pod and
//! without privileges, that the node's plugin programmed the capture: it listens on the proxy's
//! outbound port, connects to a probe address outside the pod, and expects its own listener to
//! accept that connection with the probe as `SO_ORIGINAL_DST`. If not, it exits 1 with a line
//! naming the cause, so the pod never starts uncaptured (a pod scheduled before the node's
//! plugin was installed fails here and is retried by its controller).

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

/// Flags of `outrider cni validate`.
#[derive(Debug, Clone, clap::Args)]
pub struct ValidateArgs {
    /// The proxy's outbound listener port, where the rules send the app's outbound TCP.
    #[arg(long, value_name = "PORT", default_value_t = outrider_iptables_init::ports::OUTBOUND)]
    pub outbound_port: u16,
    /// An address outside the pod that the rules capture (not exempted by the pod's annotations).
    #[arg(long, value_name = "ADDR:PORT", default_value = "198.18.255.254:1")]
    pub probe: SocketAddr,
    /// How long to wait for the redirected connection, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub timeout: u64,
}

/// Runs the check; `Err` names the cause.
pub fn validate(args: &ValidateArgs) -> Result<(), String> {
    let timeout = Duration::from_secs(args.timeout.clamp(1, 60));
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, args.outbound_port)).map_err(|e| {
        format!(
            "cannot listen on port {} to check the capture: {e} (something else holds the \
             proxy's outbound port)",
            args.outbound_port
        )
    })?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(listener.accept());
    });
    let missing = |why: String| {
        format!(
            "the capture rules are missing: outbound TCP to {} {why} instead of reaching port {}. \
             The node's outrider-cni plugin did not program this pod (is the outrider-cni \
             DaemonSet ready on this node?); delete the pod to retry",
            args.probe, args.outbound_port
        )
    };
    // The client side is kept open until the server side has been looked at.
    let _client = TcpStream::connect_timeout(&args.probe, timeout)
        .map_err(|e| missing(format!("failed ({e})")))?;
    let (accepted, _) = match rx.recv_timeout(timeout) {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(format!("accepting the probe connection failed: {e}")),
        Err(_) => return Err(missing("was answered by something else".into())),
    };
    let original = socket2::SockRef::from(&accepted)
        .original_dst()
        .map_err(|e| format!("the probe connection has no original destination: {e}"))?
        .as_socket();
    if original != Some(args.probe) {
        return Err(format!(
            "the probe connection reached port {} but its original destination is {original:?}, \
             not {}",
            args.outbound_port, args.probe
        ));
    }
    Ok(())
}

/// `outrider cni validate`: exit 0 when captured, 1 with the cause on stderr otherwise.
pub fn main(args: &ValidateArgs) -> ExitCode {
    match validate(args) {
        Ok(()) => {
            eprintln!(
                "outrider cni validate: capture verified: outbound TCP to {} reached port {} with \
                 its original destination",
                args.probe, args.outbound_port
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outrider cni validate: error: {e}");
            ExitCode::from(1)
        }
    }
}
