//! HTTP glue shared by both directions: the server side of a connection ([`server`]), the clients
//! that speak to upstreams ([`client`]), hop-by-hop header handling ([`headers`]) and the request
//! body type of the stacks ([`Body`]).

pub(crate) mod client;
pub(crate) mod headers;
pub(crate) mod server;

use bytes::Bytes;

use crate::errors::BoxError;

/// The request body inside the stacks: the client's body, boxed once by the server so layers and
/// clients do not depend on hyper's `Incoming` (a later retry layer wraps it to replay it). Its
/// errors are [`crate::errors::RequestBodyError`]s, so a broken upload is the client's failure.
pub(crate) type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
