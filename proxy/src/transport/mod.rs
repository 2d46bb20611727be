//! The transport: listening and accepting ([`listen`]), the original destination of a redirected
//! connection ([`orig_dst`]), the I/O wrappers every connection uses ([`io`]), the one path that
//! dials upstreams ([`connect`]) and the opaque TCP copy ([`tcp`]).

pub mod connect;
pub mod io;
pub mod listen;
pub mod orig_dst;
pub mod tcp;
