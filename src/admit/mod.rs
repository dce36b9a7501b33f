//! Admission: between the request parse and the candidates, who a request belongs to (its
//! [`Tenant`]), how critical it is ([`Priority`]), and whether and when it may go to an engine
//! (request → parse → admit → candidates → policy → forward):
//!
//! - [`tenant`]: a request's tenant (the tenant header, else a hash of its API key) and
//!   priority (the priority header);
//! - [`rate_limit`]: per-tenant request and token rate limits, with OpenAI's headers;
//! - [`queue`]: the router-side queue. While no engine can take a request it waits here,
//!   released in priority order and fair across tenants (deficit round robin by estimated
//!   tokens); bounded in length and in time; sheddable requests are refused at saturation.
//! - [`hold`]: one queue per model whose room is its engines' room below
//!   `--engine-queue-limit`, released as engines change.
//!
//! This module never imports the proxy (the proxy calls it) nor a leaf.

pub mod hold;
pub mod queue;
pub mod rate_limit;
pub mod tenant;

pub use crate::request::admission::{Admission, Priority, Tenant};
