//! The port and uid contract shared by `outrider init`, `outrider proxy`, the control plane and the
//! injector. Defined here once: this crate has no internal dependencies, so every other crate can
//! import it without pulling the capture code's concerns into theirs.

/// The proxy's inbound listener: all TCP arriving at the pod is redirected here.
pub const INBOUND: u16 = 15006;
/// The proxy's outbound listener: the app's outbound TCP is redirected here.
pub const OUTBOUND: u16 = 15001;
/// The proxy's admin server (`/live`, `/ready`, `/metrics`, ...). Never captured.
pub const ADMIN: u16 = 15020;
/// The control plane's API port.
pub const CONTROL: u16 = 15012;
/// The uid the proxy runs as; its own traffic is exempt from outbound capture.
pub const PROXY_UID: u32 = 1337;
