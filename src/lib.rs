//! Switchyard: a router for LLM-serving clusters whose routing policy is a hot-reloaded
//! pipeline of tiers written in TOML and Rhai.
//!
//! Data flows one way: request → [`request`] parse → candidates from [`engines`] →
//! [`policy`] decision (with the [`prefix`] index) → [`proxy`] forward → record.

pub mod bench;
pub mod cli;
pub mod config;
pub mod engines;
pub mod policy;
pub mod prefix;
pub mod proxy;
pub mod request;
pub mod sim;
pub mod tokens;
pub mod upstream;
