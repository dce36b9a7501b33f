//! Simulated vLLM engine (stub).
