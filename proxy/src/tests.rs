//! In-process tests of the whole proxy: real sockets on loopback, an injected original destination.
