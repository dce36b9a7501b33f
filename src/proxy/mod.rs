//! The HTTP proxy (stub).
