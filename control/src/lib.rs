//! The Outrider control plane: the mesh config (YAML, validated with key paths), the watch API
//! server (`outrider control`), the certificate authority that issues workload certificates
//! ([`ca`], [`token`], [`authority`]), and the API types and clients (watch, certify) that
//! `outrider-proxy` uses. Dependencies point one way: this crate never uses the proxy.

pub mod api;
pub mod authority;
pub mod ca;
pub mod cli;
pub mod client;
pub mod duration;
pub mod kubernetes;
pub mod mesh;
pub mod nesting;
mod peer;
pub mod quoted;
pub mod runtime;
pub mod server;
pub mod token;

#[cfg(test)]
mod tests;

pub use server::{prepare, serve, serve_with, ControlArgs, ControlPlane, Prepared};
