//! End-to-end tests: the real `outrider` binary, real kernels (network namespaces made by the tests
//! themselves), real clients. One test binary, one link step.
//!
//! Tests that need root or an external binary fail loudly under CI=true and print a loud SKIPPED
//! line otherwise: see `support::require`.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod analyze;
mod capture;
mod cni;
mod control;
mod dataplane;
mod discovery;
mod hardening;
mod inprocess;
mod kubeapi;
mod kubernetes;
mod mesh;
mod probes;
mod refused;
mod resilience;
mod security;
mod support;
mod webhook;
