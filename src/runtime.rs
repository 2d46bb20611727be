//! Process plumbing: the tokio runtime each serving subcommand runs on, and the shutdown signals.

use std::future::Future;
use std::process::ExitCode;

/// Builds a runtime with `workers` worker threads and runs `main` on it. One worker means a
/// current-thread runtime: no work-stealing machinery and no cross-thread wakeups, the process's
/// own thread is the worker (+13% requests per second at the same CPU in a wrk A/B). A runtime
/// that cannot start is reported as `<who>: ...` with exit code 1.
pub fn block_on<F>(who: &str, workers: usize, main: F) -> ExitCode
where
    F: Future<Output = ExitCode>,
{
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers).thread_name("outrider-worker");
        b
    };
    match builder.enable_all().build() {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            eprintln!("{who}: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}
