//! The routing benchmark (stub).
