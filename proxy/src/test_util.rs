//! Helpers that tests share (the in-process tests of the e2e binary and this crate's own), behind
//! the `test-util` feature so production builds do not carry them. (Metric readers are
//! [`crate::metrics::sum`], which the demo uses too.)

pub use crate::transport::orig_dst::FixedOrigDst;
