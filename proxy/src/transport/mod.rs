//! The transport: listening and accepting (`listen`), the original destination of a redirected
//! connection ([`orig_dst`]), the I/O wrappers every connection uses (`io`), the one path that
//! dials upstreams (`connect`) and the opaque TCP copy (`tcp`).

pub(crate) mod connect;
pub(crate) mod io;
pub(crate) mod listen;
pub mod orig_dst;
pub(crate) mod tcp;
