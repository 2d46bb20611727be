//! The `outrider` binary's own code: the process plumbing every serving subcommand shares
//! ([`runtime`]), `outrider demo` with its built-in app ([`demo`]), and the inject code the
//! control plane's admission webhook calls ([`inject_hook`]). It uses only the public APIs of the
//! proxy, control, init and kubernetes crates.

pub mod demo;
pub mod inject_hook;
pub mod runtime;
