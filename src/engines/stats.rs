//! Engine figures scraped from `GET /metrics`.

use std::time::Instant;

/// The figures last scraped from an engine's `/metrics`, summed over its label sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScrapedStats {
    pub running: f64,
    pub waiting: f64,
    pub kv_usage: f64,
    pub prefix_queries: f64,
    pub prefix_hits: f64,
    /// When the figures were scraped; `None` if never.
    pub scraped_at: Option<Instant>,
    /// The router's in-flight count for the engine at scrape time.
    pub in_flight_at_scrape: u64,
    /// Whether the last scrape failed (the figures are from an earlier one).
    pub stale: bool,
    pub last_error: Option<String>,
}
