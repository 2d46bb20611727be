//! The Outrider control plane. It lands with the control-plane issue (#5): config store, watch API,
//! certificate authority, and the API types and client that `outrider-proxy` uses. Until then this
//! crate only fixes its place in the workspace; it serves nothing.
