//! The routing benchmark (`switchyard bench`).

pub mod report;
pub mod stats;
pub mod svg;
pub mod text;
pub mod workload;
