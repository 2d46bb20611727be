//! The `outrider` binary's own code: the process plumbing every serving subcommand shares
//! ([`runtime`]) and `outrider demo` with its built-in app ([`demo`]). It uses only the public
//! APIs of the proxy, control and init crates.

pub mod demo;
pub mod runtime;
